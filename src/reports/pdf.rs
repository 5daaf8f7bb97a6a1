//! PDF reports in pure Rust (krilla, embedded DejaVu Sans): per report a title, description and
//! summary line, the chart as an image, and the result table (header repeated on every page), with
//! page numbers. Text is laid out first so every footer can say "page i of n".

use ab_glyph::{Font as _, FontRef};
use krilla::color::rgb;
use krilla::geom::{PathBuilder, Point, Rect, Size, Transform};
use krilla::image::Image;
use krilla::metadata::Metadata;
use krilla::num::NormalizedF32;
use krilla::page::PageSettings;
use krilla::paint::Fill;
use krilla::text::{Font, TextDirection};
use krilla::Document;

use super::ReportError;

/// One report's content.
pub struct Section {
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Summary lines (generation time, ATT&CK release, rows).
    pub meta: Vec<String>,
    /// Chart as PNG with its pixel size.
    pub chart_png: Option<(Vec<u8>, (u32, u32))>,
    /// Why there is no chart, if one was expected.
    pub chart_error: Option<String>,
    /// Columns (name, numeric).
    pub columns: Vec<(String, bool)>,
    /// Rows shown.
    pub rows: Vec<Vec<String>>,
    /// Rows in the result.
    pub total_rows: usize,
}

// A4 landscape, in points.
const W: f32 = 842.0;
const H: f32 = 595.0;
const M: f32 = 36.0;
const BODY: f32 = 8.5;
const ROW_H: f32 = 13.0;

#[derive(Clone, Copy)]
enum Ink {
    Text,
    Muted,
    White,
}

enum Op {
    Text {
        x: f32,
        y: f32,
        size: f32,
        bold: bool,
        ink: Ink,
        text: String,
    },
    Rect {
        x: f32,
        y: f32,
        w: f32,
        h: f32,
        rgb: (u8, u8, u8),
    },
    Image {
        idx: usize,
        x: f32,
        y: f32,
        w: f32,
        h: f32,
    },
}

struct Fonts {
    regular: FontRef<'static>,
    bold: FontRef<'static>,
}

impl Fonts {
    fn new() -> Self {
        Self {
            regular: FontRef::try_from_slice(dejavu::sans::regular()).expect("DejaVu Sans parses"),
            bold: FontRef::try_from_slice(dejavu::sans::bold()).expect("DejaVu Sans Bold parses"),
        }
    }

    /// Advance width of `s` at `size` points.
    fn width(&self, s: &str, size: f32, bold: bool) -> f32 {
        let f = if bold { &self.bold } else { &self.regular };
        let em = f.units_per_em().unwrap_or(2048.0);
        s.chars()
            .map(|c| f.h_advance_unscaled(f.glyph_id(c)))
            .sum::<f32>()
            / em
            * size
    }

    /// `s` cut to fit `max` points, with an ellipsis.
    fn clip(&self, s: &str, size: f32, bold: bool, max: f32) -> String {
        // Control characters would render as boxes and can hide text; show them as spaces.
        let s: String = s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if self.width(&s, size, bold) <= max {
            return s;
        }
        let mut out = String::new();
        let mut w = self.width("…", size, bold);
        for c in s.chars() {
            let cw = self.width(c.encode_utf8(&mut [0; 4]), size, bold);
            if w + cw > max {
                break;
            }
            w += cw;
            out.push(c);
        }
        out.push('…');
        out
    }

    /// Greedy word wrap to `max` points.
    fn wrap(&self, s: &str, size: f32, max: f32) -> Vec<String> {
        let mut lines = Vec::new();
        let mut line = String::new();
        for word in s.split_whitespace() {
            let candidate = if line.is_empty() {
                word.to_string()
            } else {
                format!("{line} {word}")
            };
            if self.width(&candidate, size, false) > max && !line.is_empty() {
                lines.push(std::mem::take(&mut line));
                line = word.to_string();
            } else {
                line = candidate;
            }
        }
        if !line.is_empty() {
            lines.push(line);
        }
        lines
            .into_iter()
            .map(|l| self.clip(&l, size, false, max))
            .collect()
    }
}

/// Lay out and write `sections` as one PDF.
pub fn render(doc_title: &str, sections: &[Section]) -> Result<Vec<u8>, ReportError> {
    let fonts = Fonts::new();
    let mut pages: Vec<Vec<Op>> = Vec::new();
    let mut images: Vec<Vec<u8>> = Vec::new();
    for s in sections {
        let mut ops = Vec::new();
        let mut y = M;
        ops.push(Op::Text {
            x: M,
            y: y + 18.0,
            size: 18.0,
            bold: true,
            ink: Ink::Text,
            text: fonts.clip(&s.title, 18.0, true, W - 2.0 * M),
        });
        y += 30.0;
        for line in fonts.wrap(&s.description, 10.5, W - 2.0 * M) {
            ops.push(Op::Text {
                x: M,
                y: y + 11.0,
                size: 10.5,
                bold: false,
                ink: Ink::Text,
                text: line,
            });
            y += 14.0;
        }
        y += 2.0;
        ops.push(Op::Text {
            x: M,
            y: y + 10.0,
            size: 9.0,
            bold: false,
            ink: Ink::Muted,
            text: fonts.clip(&s.meta.join("   ·   "), 9.0, false, W - 2.0 * M),
        });
        y += 20.0;
        match (&s.chart_png, &s.chart_error) {
            (Some((png, (pw, ph))), _) => {
                // Fit the chart into the rest of the first page.
                let avail_h = H - M - 16.0 - y;
                let scale = ((W - 2.0 * M) / *pw as f32).min(avail_h / *ph as f32);
                let (w, h) = (*pw as f32 * scale, *ph as f32 * scale);
                images.push(png.clone());
                ops.push(Op::Image {
                    idx: images.len() - 1,
                    x: M + (W - 2.0 * M - w) / 2.0,
                    y,
                    w,
                    h,
                });
                y += h + 10.0;
            }
            (None, Some(e)) => {
                ops.push(Op::Text {
                    x: M,
                    y: y + 10.0,
                    size: 10.0,
                    bold: false,
                    ink: Ink::Muted,
                    text: fonts.clip(&format!("Chart unavailable: {e}"), 10.0, false, W - 2.0 * M),
                });
                y += 20.0;
            }
            _ => {}
        }
        // The table starts on a fresh page unless a good part of it fits here.
        if !s.rows.is_empty() && H - M - 16.0 - y < ROW_H * 8.0 {
            pages.push(std::mem::take(&mut ops));
            y = M;
        }
        if s.total_rows == 0 {
            ops.push(Op::Text {
                x: M,
                y: y + 10.0,
                size: 10.0,
                bold: false,
                ink: Ink::Muted,
                text: "The query returned no rows.".into(),
            });
        } else {
            if s.rows.len() < s.total_rows {
                ops.push(Op::Text {
                    x: M,
                    y: y + 10.0,
                    size: 9.0,
                    bold: false,
                    ink: Ink::Muted,
                    text: format!(
                        "First {} of {} rows; the CSV and JSON outputs hold them all.",
                        s.rows.len(),
                        s.total_rows
                    ),
                });
                y += 16.0;
            }
            table(&fonts, s, &mut pages, &mut ops, y);
        }
        pages.push(ops);
    }
    let n = pages.len();
    let mut doc = Document::new();
    doc.set_metadata(
        Metadata::new()
            .title(doc_title.to_string())
            .creator("threatlake".to_string()),
    );
    let font = Font::new(dejavu::sans::regular().into(), 0).expect("DejaVu Sans loads");
    let bold = Font::new(dejavu::sans::bold().into(), 0).expect("DejaVu Sans Bold loads");
    for (i, mut ops) in pages.into_iter().enumerate() {
        ops.push(Op::Text {
            x: M,
            y: H - M + 14.0,
            size: 8.0,
            bold: false,
            ink: Ink::Muted,
            text: fonts.clip(&format!("threatlake · {doc_title}"), 8.0, false, W / 2.0),
        });
        let label = format!("page {} of {n}", i + 1);
        ops.push(Op::Text {
            x: W - M - fonts.width(&label, 8.0, false),
            y: H - M + 14.0,
            size: 8.0,
            bold: false,
            ink: Ink::Muted,
            text: label,
        });
        let mut page = doc.start_page_with(PageSettings::from_wh(W, H).expect("A4 size is valid"));
        let mut surface = page.surface();
        for op in ops {
            match op {
                Op::Text {
                    x,
                    y,
                    size,
                    bold: b,
                    ink,
                    text,
                } => {
                    let c = match ink {
                        Ink::Text => (0x1D, 0x27, 0x33),
                        Ink::Muted => (0x5B, 0x66, 0x75),
                        Ink::White => (0xFF, 0xFF, 0xFF),
                    };
                    surface.set_fill(Some(fill(c)));
                    surface.draw_text(
                        Point::from_xy(x, y),
                        if b { bold.clone() } else { font.clone() },
                        size,
                        &text,
                        false,
                        TextDirection::Auto,
                    );
                }
                Op::Rect { x, y, w, h, rgb } => {
                    if let Some(r) = Rect::from_xywh(x, y, w, h) {
                        let mut pb = PathBuilder::new();
                        pb.push_rect(r);
                        if let Some(path) = pb.finish() {
                            surface.set_fill(Some(fill(rgb)));
                            surface.draw_path(&path);
                        }
                    }
                }
                Op::Image { idx, x, y, w, h } => {
                    let image = Image::from_png(images[idx].clone().into(), true).map_err(|e| {
                        ReportError::Write {
                            path: doc_title.to_string(),
                            message: format!("chart image: {e}"),
                        }
                    })?;
                    if let Some(size) = Size::from_wh(w, h) {
                        surface.push_transform(&Transform::from_translate(x, y));
                        surface.draw_image(image, size);
                        surface.pop();
                    }
                }
            }
        }
        surface.finish();
        page.finish();
    }
    doc.finish().map_err(|e| ReportError::Write {
        path: doc_title.to_string(),
        message: format!("PDF: {e:?}"),
    })
}

fn fill((r, g, b): (u8, u8, u8)) -> Fill {
    Fill {
        paint: rgb::Color::new(r, g, b).into(),
        opacity: NormalizedF32::ONE,
        rule: Default::default(),
    }
}

/// Column widths: natural widths (capped) shrunk proportionally to the page, at least 36 pt each.
fn widths(fonts: &Fonts, s: &Section) -> Vec<f32> {
    let avail = W - 2.0 * M;
    let mut w: Vec<f32> = s
        .columns
        .iter()
        .enumerate()
        .map(|(c, (name, _))| {
            let head = fonts.width(name, BODY, true);
            let cells = s
                .rows
                .iter()
                .take(200)
                .map(|r| fonts.width(r.get(c).map_or("", String::as_str), BODY, false))
                .fold(0.0f32, f32::max);
            head.max(cells).min(280.0) + 8.0
        })
        .collect();
    let total: f32 = w.iter().sum();
    if total > avail {
        let f = avail / total;
        w.iter_mut().for_each(|x| *x = (*x * f).max(36.0));
    }
    w
}

fn table(fonts: &Fonts, s: &Section, pages: &mut Vec<Vec<Op>>, ops: &mut Vec<Op>, mut y: f32) {
    let w = widths(fonts, s);
    let header = |ops: &mut Vec<Op>, y: f32| {
        ops.push(Op::Rect {
            x: M,
            y,
            w: w.iter().sum(),
            h: ROW_H + 2.0,
            rgb: (0x1D, 0x27, 0x33),
        });
        let mut x = M;
        for ((name, _), cw) in s.columns.iter().zip(&w) {
            ops.push(Op::Text {
                x: x + 4.0,
                y: y + ROW_H - 2.5,
                size: BODY,
                bold: true,
                ink: Ink::White,
                text: fonts.clip(name, BODY, true, cw - 8.0),
            });
            x += cw;
        }
    };
    header(ops, y);
    y += ROW_H + 2.0;
    for (i, row) in s.rows.iter().enumerate() {
        if y + ROW_H > H - M - 16.0 {
            pages.push(std::mem::take(ops));
            y = M;
            header(ops, y);
            y += ROW_H + 2.0;
        }
        if i % 2 == 1 {
            ops.push(Op::Rect {
                x: M,
                y,
                w: w.iter().sum(),
                h: ROW_H,
                rgb: (0xF2, 0xF5, 0xF8),
            });
        }
        let mut x = M;
        for (c, cw) in w.iter().enumerate() {
            let text = fonts.clip(row.get(c).map_or("", String::as_str), BODY, false, cw - 8.0);
            let numeric = s.columns.get(c).is_some_and(|c| c.1);
            let tx = if numeric {
                x + cw - 4.0 - fonts.width(&text, BODY, false)
            } else {
                x + 4.0
            };
            ops.push(Op::Text {
                x: tx,
                y: y + ROW_H - 3.0,
                size: BODY,
                bold: false,
                ink: Ink::Text,
                text,
            });
            x += cw;
        }
        y += ROW_H;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_clips_and_wraps() {
        let f = Fonts::new();
        let a = f.width("T1059", 10.0, false);
        assert!(a > 20.0 && a < 40.0, "{a}");
        assert!(f.width("T1059", 20.0, false) > 1.9 * a);
        let c = f.clip("Command and Scripting Interpreter", 10.0, false, 60.0);
        assert!(c.ends_with('…') && f.width(&c, 10.0, false) <= 60.0, "{c}");
        let lines = f.wrap(
            "one two three four five six seven eight nine ten",
            10.0,
            80.0,
        );
        assert!(lines.len() > 2 && lines.iter().all(|l| f.width(l, 10.0, false) <= 80.0));
        assert_eq!(f.clip("a\u{7}b", 10.0, false, 100.0), "a b");
    }
}
