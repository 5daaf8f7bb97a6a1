//! Charts from SQL results: plotters draws bar, horizontal-bar, line, ATT&CK-matrix heatmap,
//! world-map and scatter charts as SVG or PNG, with an embedded DejaVu font (no system fonts).
//!
//! Every chart is the rendering of one query result. A [`ChartSpec`] names the kind and, optionally,
//! the columns to use (`hbar x=technique_id y=items`); unnamed columns are picked by type (the first
//! text column for labels, the first numeric one for values).

pub mod frame;
pub mod matrix;
pub mod scatter;
pub mod world;

use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

pub use frame::Frame;

/// Errors drawing charts.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ChartError {
    /// The chart specification is not understood.
    #[error("chart spec {spec:?}: {message}; use `KIND [x=COL] [y=COL] [series=COL]` with KIND one of bar, hbar, line, heatmap, map, scatter")]
    Spec {
        /// The spec given.
        spec: String,
        /// What is wrong.
        message: String,
    },
    /// The query result does not fit the chart.
    #[error("{kind} chart: {message}")]
    Data {
        /// Chart kind.
        kind: &'static str,
        /// What is missing.
        message: String,
    },
    /// Drawing failed.
    #[error("drawing the {kind} chart failed: {message}")]
    Draw {
        /// Chart kind.
        kind: &'static str,
        /// Backend message.
        message: String,
    },
}

/// Chart kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChartKind {
    /// Vertical bars, one per row.
    Bar,
    /// Horizontal bars, one per row (long labels such as technique names).
    HBar,
    /// One line per series over a time or numeric x axis.
    Line,
    /// ATT&CK matrix: tactics as columns, techniques as cells coloured by value.
    Heatmap,
    /// World map coloured by value per country.
    Map,
    /// Points in two dimensions coloured by series; a text column can be projected to 2-D.
    Scatter,
}

impl ChartKind {
    /// Parse a kind name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "bar" => Self::Bar,
            "hbar" => Self::HBar,
            "line" => Self::Line,
            "heatmap" => Self::Heatmap,
            "map" => Self::Map,
            "scatter" => Self::Scatter,
            _ => return None,
        })
    }

    /// The kind's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bar => "bar",
            Self::HBar => "hbar",
            Self::Line => "line",
            Self::Heatmap => "heatmap",
            Self::Map => "map",
            Self::Scatter => "scatter",
        }
    }
}

/// What to draw from a result.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartSpec {
    /// Kind.
    pub kind: ChartKind,
    /// Label / x / country / technique-id column.
    pub x: Option<String>,
    /// Value / y column.
    pub y: Option<String>,
    /// Series (colour) column.
    pub series: Option<String>,
    /// Scatter: project this text column to 2-D with the mapping model.
    pub project: Option<String>,
    /// Bars shown at most (the rest are summed into "other").
    pub limit: usize,
}

impl ChartSpec {
    /// A spec of `kind` with every column picked automatically.
    pub fn of(kind: ChartKind) -> Self {
        Self {
            kind,
            x: None,
            y: None,
            series: None,
            project: None,
            limit: 30,
        }
    }

    /// Parse `KIND [x=COL] [y=COL] [series=COL] [project=COL] [limit=N]`.
    pub fn parse(spec: &str) -> Result<Self, ChartError> {
        let err = |message: String| ChartError::Spec {
            spec: spec.to_string(),
            message,
        };
        let mut words = spec.split_whitespace();
        let kind = words.next().ok_or_else(|| err("empty".into()))?;
        let kind = ChartKind::parse(kind).ok_or_else(|| err(format!("unknown kind {kind:?}")))?;
        let mut s = Self::of(kind);
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| err(format!("{w:?} is not key=value")))?;
            let v = Some(v.to_string());
            match k {
                "x" => s.x = v,
                "y" => s.y = v,
                "series" => s.series = v,
                "project" => s.project = v,
                "limit" => {
                    s.limit = v
                        .as_deref()
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n > 0)
                        .ok_or_else(|| err(format!("limit must be a positive number, not {w:?}")))?
                }
                _ => return Err(err(format!("unknown key {k:?}"))),
            }
        }
        Ok(s)
    }
}

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Scalable vector graphics (text stays text).
    Svg,
    /// Raster (RGB PNG).
    Png,
}

impl ImageFormat {
    /// From a file extension.
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "svg" => Some(Self::Svg),
            "png" => Some(Self::Png),
            _ => None,
        }
    }
}

/// A drawn chart.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The image.
    pub bytes: Vec<u8>,
    /// Pixel size.
    pub size: (u32, u32),
    /// Data marks drawn (bars, line points, coloured cells or countries, scatter points).
    pub marks: usize,
}

/// A chart ready to draw on any plotters backend.
pub trait Drawable {
    /// Pixel size wanted.
    fn size(&self) -> (u32, u32);
    /// Draw; returns the number of data marks.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<usize, String>;
}

/// The font family charts use (registered once from the embedded DejaVu Sans).
pub const FONT: &str = "sans-serif";

/// Register the embedded fonts with plotters (idempotent).
pub fn init_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans ships inside the `dejavu` crate; the bytes are valid TrueType.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Draw `chart` as `format`.
pub fn render(
    chart: &impl Drawable,
    format: ImageFormat,
    kind: &'static str,
) -> Result<Rendered, ChartError> {
    init_fonts();
    let size = chart.size();
    let fail = |message: String| ChartError::Draw { kind, message };
    match format {
        ImageFormat::Svg => {
            let mut svg = String::new();
            let marks = {
                let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                let m = chart.draw(&root).map_err(fail)?;
                root.present().map_err(|e| fail(e.to_string()))?;
                m
            };
            Ok(Rendered {
                bytes: svg.into_bytes(),
                size,
                marks,
            })
        }
        ImageFormat::Png => {
            let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
            let marks = {
                let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
                let m = chart.draw(&root).map_err(fail)?;
                root.present().map_err(|e| fail(e.to_string()))?;
                m
            };
            let mut bytes = Vec::new();
            {
                let mut enc = png::Encoder::new(&mut bytes, size.0, size.1);
                enc.set_color(png::ColorType::Rgb);
                enc.set_depth(png::BitDepth::Eight);
                enc.set_compression(png::Compression::Fast);
                let mut w = enc.write_header().map_err(|e| fail(e.to_string()))?;
                w.write_image_data(&rgb).map_err(|e| fail(e.to_string()))?;
            }
            Ok(Rendered { bytes, size, marks })
        }
    }
}

/// Qualitative palette (Tableau 10), for series.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xBA, 0xB0, 0xAC),
];

/// Sequential scale from pale yellow to dark red for `t` in 0..=1 (heatmaps and maps).
pub fn heat(t: f64) -> RGBColor {
    const STOPS: [(f64, (u8, u8, u8)); 4] = [
        (0.0, (0xFF, 0xF3, 0xB0)),
        (0.35, (0xFD, 0xAE, 0x61)),
        (0.7, (0xE3, 0x4A, 0x33)),
        (1.0, (0x99, 0x00, 0x0D)),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    for w in STOPS.windows(2) {
        let ((a, ca), (b, cb)) = (w[0], w[1]);
        if t <= b {
            let f = (t - a) / (b - a);
            let mix = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * f).round() as u8;
            return RGBColor(mix(ca.0, cb.0), mix(ca.1, cb.1), mix(ca.2, cb.2));
        }
    }
    RGBColor(0x99, 0x00, 0x0D)
}

/// Shorten `s` to `n` characters with an ellipsis.
pub fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Compact number labels: 1234 → "1.2k".
pub fn short_number(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub(crate) fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> String {
    e.to_string()
}

/// Bar or horizontal-bar chart of label → value.
pub struct Bars {
    /// Title.
    pub title: String,
    /// Value axis name.
    pub value_name: String,
    /// Bars, in order.
    pub bars: Vec<(String, f64)>,
    /// Horizontal.
    pub horizontal: bool,
}

impl Bars {
    /// Labels from `spec.x` (or every text column before the value, joined), values from `spec.y`;
    /// past `spec.limit` bars the rest are summed into one "other" bar.
    pub fn from_frame(
        frame: &Frame,
        spec: &ChartSpec,
        title: &str,
        horizontal: bool,
    ) -> Result<Self, ChartError> {
        let kind = if horizontal { "hbar" } else { "bar" };
        let y = frame.value_column(spec.y.as_deref(), kind)?;
        let labels = match spec.x.as_deref() {
            Some(x) => frame.strings(frame.column(x, kind)?),
            None => frame.label_strings(y),
        };
        let values = frame.numbers(y);
        let mut bars: Vec<(String, f64)> = labels
            .into_iter()
            .zip(values)
            .map(|(l, v)| (l, v.unwrap_or(0.0)))
            .collect();
        // Past the limit, say how many rows are left out (summing them would mislead when rows
        // overlap, as items mapped to several techniques do).
        let mut value_name = frame.names[y].clone();
        if bars.len() > spec.limit {
            value_name = format!("{value_name} (first {} of {} rows)", spec.limit, bars.len());
            bars.truncate(spec.limit);
        }
        Ok(Self {
            title: title.to_string(),
            value_name,
            bars,
            horizontal,
        })
    }
}

impl Drawable for Bars {
    fn size(&self) -> (u32, u32) {
        if self.horizontal {
            (1000, (90 + 24 * self.bars.len().max(1)) as u32)
        } else {
            (1000, 560)
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<usize, String> {
        root.fill(&WHITE).map_err(draw_err)?;
        let n = self.bars.len();
        let max = self
            .bars
            .iter()
            .map(|b| b.1)
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.08;
        let color = PALETTE[0];
        let label_of = |i: usize| self.bars.get(i).map(|b| b.0.as_str()).unwrap_or("");
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(&self.title, (FONT, 22).into_font().style(FontStyle::Bold))
            .margin(14);
        if self.horizontal {
            let mut chart = builder
                .x_label_area_size(36)
                .y_label_area_size(330)
                .build_cartesian_2d(0f64..max, (0..n.saturating_sub(1)).into_segmented())
                .map_err(draw_err)?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(n.max(1))
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) => clip(label_of(n.saturating_sub(1 + *i)), 48),
                    _ => String::new(),
                })
                .x_label_formatter(&|v| short_number(*v))
                .x_desc(self.value_name.as_str())
                .label_style((FONT, 13))
                .light_line_style(RGBColor(0xEE, 0xEE, 0xEE))
                .draw()
                .map_err(draw_err)?;
            // First row at the top.
            chart
                .draw_series(self.bars.iter().enumerate().map(|(i, (_, v))| {
                    let row = n - 1 - i;
                    let mut r = Rectangle::new(
                        [
                            (0.0, SegmentValue::Exact(row)),
                            (*v, SegmentValue::Exact(row + 1)),
                        ],
                        color.filled(),
                    );
                    r.set_margin(3, 3, 0, 0);
                    r
                }))
                .map_err(draw_err)?;
            chart
                .draw_series(self.bars.iter().enumerate().map(|(i, (_, v))| {
                    Text::new(
                        short_number(*v),
                        (*v + max * 0.005, SegmentValue::CenterOf(n - 1 - i)),
                        TextStyle::from((FONT, 12).into_font())
                            .pos(Pos::new(HPos::Left, VPos::Center)),
                    )
                }))
                .map_err(draw_err)?;
        } else {
            let mut chart = builder
                .x_label_area_size(if n > 8 { 120 } else { 40 })
                .y_label_area_size(60)
                .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0f64..max)
                .map_err(draw_err)?;
            let rotate = n > 8;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n.max(1))
                .x_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) => clip(label_of(*i), if rotate { 18 } else { 28 }),
                    _ => String::new(),
                })
                .x_label_style(if rotate {
                    (FONT, 12)
                        .into_font()
                        .transform(FontTransform::Rotate270)
                        .into_text_style(root)
                } else {
                    (FONT, 13).into_font().into_text_style(root)
                })
                .y_label_formatter(&|v| short_number(*v))
                .y_desc(self.value_name.as_str())
                .label_style((FONT, 13))
                .light_line_style(RGBColor(0xEE, 0xEE, 0xEE))
                .draw()
                .map_err(draw_err)?;
            chart
                .draw_series(self.bars.iter().enumerate().map(|(i, (_, v))| {
                    let mut r = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), 0.0),
                            (SegmentValue::Exact(i + 1), *v),
                        ],
                        color.filled(),
                    );
                    r.set_margin(0, 0, 4, 4);
                    r
                }))
                .map_err(draw_err)?;
        }
        Ok(n)
    }
}

/// Line chart: one line per series over x.
pub struct Lines {
    /// Title.
    pub title: String,
    /// X axis name.
    pub x_name: String,
    /// Y axis name.
    pub y_name: String,
    /// Whether x values are days since 1970-01-01 (labelled as dates).
    pub dates: bool,
    /// (series, points sorted by x).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

impl Lines {
    /// x from `spec.x` (or the first date/time or numeric column), y from `spec.y`, series from
    /// `spec.series` (or the first text column).
    pub fn from_frame(frame: &Frame, spec: &ChartSpec, title: &str) -> Result<Self, ChartError> {
        let x = match spec.x.as_deref() {
            Some(x) => frame.column(x, "line")?,
            None => frame.x_column().ok_or_else(|| ChartError::Data {
                kind: "line",
                message: "no date, time or numeric column for the x axis".into(),
            })?,
        };
        let y = frame.value_column_except(spec.y.as_deref(), "line", &[x])?;
        let series = match spec.series.as_deref() {
            Some(s) => Some(frame.column(s, "line")?),
            None => frame.first_text_column(&[x, y]),
        };
        let (xs, dates) = frame.axis_values(x);
        let ys = frame.numbers(y);
        let names = series.map(|s| frame.strings(s));
        let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for (i, (xv, yv)) in xs.into_iter().zip(ys).enumerate() {
            let (Some(xv), Some(yv)) = (xv, yv) else {
                continue;
            };
            let name = names
                .as_ref()
                .map(|n| n[i].clone())
                .unwrap_or_else(|| frame.names[y].clone());
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push((xv, yv)),
                None => out.push((name, vec![(xv, yv)])),
            }
        }
        for (_, pts) in &mut out {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(Self {
            title: title.to_string(),
            x_name: frame.names[x].clone(),
            y_name: frame.names[y].clone(),
            dates,
            series: out,
        })
    }
}

impl Drawable for Lines {
    fn size(&self) -> (u32, u32) {
        (1000, 520)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<usize, String> {
        root.fill(&WHITE).map_err(draw_err)?;
        let pts = self.series.iter().flat_map(|s| s.1.iter());
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
        for (x, y) in pts {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y1 = y1.max(*y);
        }
        if x0 > x1 {
            (x0, x1) = (0.0, 1.0);
        }
        if x0 == x1 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        }
        let y1 = y1.max(1e-9) * 1.1;
        let dates = self.dates;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FONT, 22).into_font().style(FontStyle::Bold))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, 0f64..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_labels(8)
            .x_label_formatter(&|v| {
                if dates {
                    frame::date_label(*v)
                } else {
                    short_number(*v)
                }
            })
            .y_label_formatter(&|v| short_number(*v))
            .x_desc(self.x_name.as_str())
            .y_desc(self.y_name.as_str())
            .label_style((FONT, 13))
            .light_line_style(RGBColor(0xEE, 0xEE, 0xEE))
            .draw()
            .map_err(draw_err)?;
        let mut marks = 0;
        for (i, (name, pts)) in self.series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(draw_err)?
                .label(clip(name, 30))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3))
                });
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
                .map_err(draw_err)?;
            marks += pts.len();
        }
        if !self.series.is_empty() {
            legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
        Ok(marks)
    }
}

/// The series legend of line and scatter charts.
pub fn legend<'a, DB: DrawingBackend + 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(0xCC, 0xCC, 0xCC))
        .label_font((FONT, 12))
        .draw()
        .map_err(draw_err)
}

/// A chart built from a result, ready to render in any format.
pub enum Chart {
    /// Bar or horizontal bar.
    Bars(Bars),
    /// Lines.
    Lines(Lines),
    /// ATT&CK matrix heatmap.
    Matrix(matrix::Matrix),
    /// World map.
    Map(world::WorldMap),
    /// Scatter.
    Scatter(scatter::Scatter),
}

impl Chart {
    /// Build the chart `spec` asks for from a query result. Heatmaps read the ATT&CK matrix of
    /// `domain` from the lake; projected scatters use the engine's mapping model.
    pub async fn build(
        engine: &crate::sql::Engine,
        spec: &ChartSpec,
        title: &str,
        frame: &Frame,
        domain: &str,
    ) -> Result<Self, ChartError> {
        Ok(match spec.kind {
            ChartKind::Bar | ChartKind::HBar => Chart::Bars(Bars::from_frame(
                frame,
                spec,
                title,
                spec.kind == ChartKind::HBar,
            )?),
            ChartKind::Line => Chart::Lines(Lines::from_frame(frame, spec, title)?),
            ChartKind::Heatmap => {
                let layout = matrix::load_layout(engine, domain).await?;
                Chart::Matrix(matrix::Matrix::from_frame(frame, spec, &layout, title)?)
            }
            ChartKind::Map => Chart::Map(world::WorldMap::from_frame(frame, spec, title)?),
            ChartKind::Scatter => {
                let mapper = match spec.project {
                    Some(_) if frame.rows > 0 => {
                        Some(engine.mapper.get().map_err(|e| ChartError::Data {
                            kind: "scatter",
                            message: e.to_string(),
                        })?)
                    }
                    _ => None,
                };
                Chart::Scatter(scatter::Scatter::from_frame(
                    frame,
                    spec,
                    title,
                    mapper.as_deref(),
                )?)
            }
        })
    }

    /// Draw as `format`.
    pub fn render(&self, format: ImageFormat) -> Result<Rendered, ChartError> {
        match self {
            Chart::Bars(c) => render(c, format, if c.horizontal { "hbar" } else { "bar" }),
            Chart::Lines(c) => render(c, format, "line"),
            Chart::Matrix(c) => render(c, format, "heatmap"),
            Chart::Map(c) => render(c, format, "map"),
            Chart::Scatter(c) => render(c, format, "scatter"),
        }
    }
}

/// Draw a horizontal colour legend (`lo`..`hi` on the heat scale) in `area`.
pub fn heat_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    width: i32,
    lo: f64,
    hi: f64,
    name: &str,
) -> Result<(), String> {
    let steps = 40;
    for i in 0..steps {
        let x0 = x + width * i / steps;
        let x1 = x + width * (i + 1) / steps;
        area.draw(&Rectangle::new(
            [(x0, y), (x1, y + 12)],
            heat(i as f64 / (steps - 1) as f64).filled(),
        ))
        .map_err(draw_err)?;
    }
    let style = (FONT, 12).into_font().color(&BLACK);
    area.draw(&Text::new(short_number(lo), (x, y + 16), style.clone()))
        .map_err(draw_err)?;
    area.draw(&Text::new(
        short_number(hi),
        (x + width - 8 * short_number(hi).len() as i32, y + 16),
        style.clone(),
    ))
    .map_err(draw_err)?;
    area.draw(&Text::new(name.to_string(), (x, y - 16), style))
        .map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_and_rejects() {
        let s = ChartSpec::parse("hbar x=technique_id y=items limit=12").unwrap();
        assert_eq!(s.kind, ChartKind::HBar);
        assert_eq!(s.x.as_deref(), Some("technique_id"));
        assert_eq!(s.y.as_deref(), Some("items"));
        assert_eq!(s.limit, 12);
        for bad in ["", "pie", "bar x", "bar colour=red", "bar limit=0"] {
            let e = ChartSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("KIND"), "{bad}: {e}");
        }
    }

    #[test]
    fn heat_scale_is_monotone_in_darkness() {
        let lum = |c: RGBColor| c.0 as u32 + c.1 as u32 + c.2 as u32;
        let mut last = u32::MAX;
        for i in 0..=10 {
            let l = lum(heat(i as f64 / 10.0));
            assert!(l <= last, "step {i}");
            last = l;
        }
        assert_eq!(heat(f64::NAN), heat(0.0));
    }

    #[test]
    fn numbers_and_clipping() {
        assert_eq!(short_number(1234.0), "1.2k");
        assert_eq!(short_number(25000.0), "25k");
        assert_eq!(short_number(3.0), "3");
        assert_eq!(short_number(0.456), "0.46");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abc", 4), "abc");
    }
}
