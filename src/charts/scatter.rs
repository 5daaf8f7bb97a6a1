//! Scatter charts: numeric x/y columns coloured by a series column, or a text column laid out in two
//! dimensions — each text's sentence vector from the mapping model, reduced by PCA
//! (linfa-reduction) — and coloured by k-means cluster (linfa-clustering) of those vectors, each
//! cluster named after the series value (for mapped intel: the technique) most common in it.

use linfa::prelude::*;
use linfa_clustering::KMeans;
use linfa_reduction::Pca;
use ndarray::Array2;
use plotters::coord::Shift;
use plotters::prelude::*;
use rand::SeedableRng;
use threatlake_udfs::mapper::{Mapper, Scratch};

use super::{clip, draw_err, short_number, ChartError, ChartSpec, Drawable, Frame, FONT, PALETTE};

type Points = Vec<Option<(f64, f64)>>;

/// Series shown with their own colour; the rest are grey "other".
const MAX_SERIES: usize = 9;

/// The scatter chart.
pub struct Scatter {
    /// Title.
    pub title: String,
    /// Axis names.
    pub axes: (String, String),
    /// (series, points).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
}

/// Texts laid out: 2-D PCA coordinates and a k-means cluster per text.
pub struct Projection {
    /// Coordinates.
    pub points: Vec<(f64, f64)>,
    /// Cluster of each text.
    pub clusters: Vec<usize>,
    /// Number of clusters.
    pub k: usize,
}

/// Lay `texts` out with `mapper`'s sentence vectors: PCA to two dimensions for position, k-means
/// (k = n/25, 2..=8, fixed seed) in the full vector space for colour. Fewer than six texts are placed
/// on a line in one cluster.
pub fn project(mapper: &Mapper, texts: &[String]) -> Result<Projection, ChartError> {
    let mut scratch = Scratch::default();
    let vecs: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| mapper.sentence_vector(t, &mut scratch))
        .collect();
    let dims = vecs.first().map_or(0, Vec::len);
    let n = texts.len();
    if n < 6 || dims < 2 {
        return Ok(Projection {
            points: (0..n).map(|i| (i as f64, 0.0)).collect(),
            clusters: vec![0; n],
            k: 1,
        });
    }
    let mut m = Array2::<f64>::zeros((n, dims));
    for (i, v) in vecs.iter().enumerate() {
        for (j, x) in v.iter().enumerate() {
            m[[i, j]] = *x as f64;
        }
    }
    let fail = |what: &str, e: String| ChartError::Data {
        kind: "scatter",
        message: format!("{what} of {n} texts: {e}"),
    };
    let data = DatasetBase::from(m.clone());
    let pca = Pca::params(2)
        .fit(&data)
        .map_err(|e| fail("PCA", e.to_string()))?;
    let p = pca.predict(&m);
    let k = (n / 25).clamp(2, 8);
    let rng = rand_xoshiro::Xoshiro256Plus::seed_from_u64(7);
    let km = KMeans::params_with_rng(k, rng)
        .max_n_iterations(60)
        .tolerance(1e-4)
        .fit(&data)
        .map_err(|e| fail("k-means", e.to_string()))?;
    let clusters = km.predict(&m).to_vec();
    Ok(Projection {
        points: (0..n).map(|i| (p[[i, 0]], p[[i, 1]])).collect(),
        clusters,
        k,
    })
}

/// Name cluster `c` after its most common `names` value: "T1059.003 Windows Command Shell (34%)".
fn cluster_name(c: usize, clusters: &[usize], names: Option<&Vec<String>>) -> String {
    let members: Vec<usize> = (0..clusters.len()).filter(|i| clusters[*i] == c).collect();
    let Some(names) = names else {
        return format!("cluster {}", c + 1);
    };
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for i in &members {
        *counts.entry(names[*i].as_str()).or_default() += 1;
    }
    match counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) {
        Some((name, n)) => format!(
            "{} ({}%)",
            clip(name, 30),
            (100 * n).checked_div(members.len()).unwrap_or(0)
        ),
        None => format!("cluster {}", c + 1),
    }
}

impl Scatter {
    /// Points from `x`/`y` numeric columns, or from `spec.project` (a text column) laid out with
    /// `mapper`; colours from `spec.series` (or the first other text column).
    pub fn from_frame(
        frame: &Frame,
        spec: &ChartSpec,
        title: &str,
        mapper: Option<&Mapper>,
    ) -> Result<Self, ChartError> {
        let mut clusters: Option<Projection> = None;
        let (points, axes, used): (Points, (String, String), Vec<usize>) =
            match spec.project.as_deref() {
                Some(col) => {
                    let c = frame.column(col, "scatter")?;
                    let mapper = mapper.ok_or_else(|| ChartError::Data {
                        kind: "scatter",
                        message:
                            "projecting text needs the mapping model; run `threatlake model build`"
                                .into(),
                    })?;
                    let p = project(mapper, &frame.strings(c))?;
                    let pts = p.points.iter().copied().map(Some).collect();
                    clusters = Some(p);
                    (pts, ("component 1".into(), "component 2".into()), vec![c])
                }
                None => {
                    let x = frame.value_column(spec.x.as_deref(), "scatter")?;
                    let y = frame.value_column_except(spec.y.as_deref(), "scatter", &[x])?;
                    let pts = frame
                        .numbers(x)
                        .into_iter()
                        .zip(frame.numbers(y))
                        .map(|(a, b)| a.zip(b))
                        .collect();
                    (
                        pts,
                        (frame.names[x].clone(), frame.names[y].clone()),
                        vec![x, y],
                    )
                }
            };
        let names = match spec.series.as_deref() {
            Some(s) => Some(frame.strings(frame.column(s, "scatter")?)),
            None => frame.first_text_column(&used).map(|c| frame.strings(c)),
        };
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        let cluster_names: Vec<String> = clusters
            .as_ref()
            .map(|p| {
                (0..p.k)
                    .map(|c| {
                        format!(
                            "{}. {}",
                            c + 1,
                            cluster_name(c, &p.clusters, names.as_ref())
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (i, p) in points.into_iter().enumerate() {
            let Some(p) = p else { continue };
            let name = match &clusters {
                Some(c) => cluster_names[c.clusters[i]].clone(),
                None => names.as_ref().map_or_else(String::new, |n| n[i].clone()),
            };
            match series.iter_mut().find(|s| s.0 == name) {
                Some(s) => s.1.push(p),
                None => series.push((name, vec![p])),
            }
        }
        // Largest series keep their colour; the rest become "other".
        series.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        if series.len() > MAX_SERIES {
            let rest: Vec<(f64, f64)> = series.drain(MAX_SERIES..).flat_map(|s| s.1).collect();
            series.push(("other".into(), rest));
        }
        Ok(Self {
            title: title.to_string(),
            axes,
            series,
        })
    }
}

impl Drawable for Scatter {
    fn size(&self) -> (u32, u32) {
        (1000, 680)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<usize, String> {
        root.fill(&WHITE).map_err(draw_err)?;
        let all = self.series.iter().flat_map(|s| s.1.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in all {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y0 = y0.min(*y);
            y1 = y1.max(*y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = |a: f64, b: f64| {
            let d = ((b - a) * 0.06).max(1e-6);
            (a - d)..(b + d)
        };
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, (FONT, 22).into_font().style(FontStyle::Bold))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(pad(x0, x1), pad(y0, y1))
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|v| short_number(*v))
            .y_label_formatter(&|v| short_number(*v))
            .x_desc(self.axes.0.as_str())
            .y_desc(self.axes.1.as_str())
            .label_style((FONT, 13))
            .light_line_style(RGBColor(0xEE, 0xEE, 0xEE))
            .draw()
            .map_err(draw_err)?;
        let mut marks = 0;
        for (i, (name, pts)) in self.series.iter().enumerate() {
            let c = if name == "other" {
                RGBColor(0xB0, 0xB0, 0xB0)
            } else {
                PALETTE[i % PALETTE.len()]
            };
            let label = format!("{} ({})", clip(name, 48), pts.len());
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.mix(0.8).filled())))
                .map_err(draw_err)?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 6, y), 5, c.filled()));
            marks += pts.len();
        }
        if self.series.iter().any(|s| !s.0.is_empty()) {
            super::legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        Ok(marks)
    }
}
