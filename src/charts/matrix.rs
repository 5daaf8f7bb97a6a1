//! The ATT&CK matrix heatmap: tactics as columns in matrix order, techniques as cells (alphabetical,
//! as in the ATT&CK Navigator) coloured by a value per technique id, with a legend.

use std::collections::{BTreeMap, HashMap};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{clip, draw_err, heat, heat_legend, ChartError, ChartSpec, Drawable, Frame, FONT};
use crate::sql::Engine;

/// One tactic column.
#[derive(Debug, Clone)]
pub struct Tactic {
    /// Shortname (`initial-access`).
    pub shortname: String,
    /// Display name.
    pub name: String,
}

/// One technique of the layout.
#[derive(Debug, Clone)]
pub struct Technique {
    /// `T1059` or `T1059.001`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Tactic shortnames.
    pub tactics: Vec<String>,
}

/// A domain's matrix: tactics in order and the (non-revoked, non-deprecated) techniques.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Domain.
    pub domain: String,
    /// Tactics in matrix order.
    pub tactics: Vec<Tactic>,
    /// Techniques and sub-techniques.
    pub techniques: Vec<Technique>,
}

/// Read the newest release's matrix of `domain` from the lake.
pub async fn load_layout(engine: &Engine, domain: &str) -> Result<Layout, ChartError> {
    let err = |e: crate::sql::SqlError| ChartError::Data {
        kind: "heatmap",
        message: format!("reading the ATT&CK matrix: {e}"),
    };
    let q = "SELECT t.domain, t.shortname, t.name FROM mitre_attack_tactics t \
             JOIN attack_versions_current v ON t.domain = v.domain AND t.attack_version = v.attack_version \
             ORDER BY t.matrix_order, t.name";
    let r = engine.run(q).await.map_err(err)?.remove(0);
    let f = Frame::new(&r.schema, &r.batches);
    let (d, s, n) = (f.strings(0), f.strings(1), f.strings(2));
    let tactics: Vec<Tactic> = (0..f.rows)
        .filter(|i| d[*i] == domain)
        .map(|i| Tactic {
            shortname: s[i].clone(),
            name: n[i].clone(),
        })
        .collect();
    if tactics.is_empty() {
        return Err(ChartError::Data {
            kind: "heatmap",
            message: format!(
                "the lake has no ATT&CK {domain} tactics; run `threatlake ingest attack --domain {domain}`"
            ),
        });
    }
    let q = "SELECT t.domain, t.technique_id, t.name, unnest(t.tactics) AS tactic FROM mitre_attack_techniques t \
             JOIN attack_versions_current v ON t.domain = v.domain AND t.attack_version = v.attack_version \
             WHERE NOT t.revoked AND NOT t.deprecated";
    let r = engine.run(q).await.map_err(err)?.remove(0);
    let f = Frame::new(&r.schema, &r.batches);
    let (d, id, name, tactic) = (f.strings(0), f.strings(1), f.strings(2), f.strings(3));
    let mut techs: BTreeMap<String, Technique> = BTreeMap::new();
    for i in (0..f.rows).filter(|i| d[*i] == domain) {
        techs
            .entry(id[i].clone())
            .or_insert_with(|| Technique {
                id: id[i].clone(),
                name: name[i].clone(),
                tactics: vec![],
            })
            .tactics
            .push(tactic[i].clone());
    }
    Ok(Layout {
        domain: domain.to_string(),
        tactics,
        techniques: techs.into_values().collect(),
    })
}

/// One cell.
#[derive(Debug, Clone)]
struct Cell {
    id: String,
    name: String,
    value: Option<f64>,
    sub: bool,
}

/// The heatmap.
pub struct Matrix {
    /// Title.
    pub title: String,
    /// Legend name (the value column).
    pub value_name: String,
    columns: Vec<(Tactic, Vec<Cell>)>,
    lo: f64,
    hi: f64,
    /// Technique ids in the result that the matrix does not have.
    pub unplaced: usize,
}

fn parent(id: &str) -> &str {
    id.split('.').next().unwrap_or(id)
}

impl Matrix {
    /// Values per technique id from the result (`spec.x` or `technique_id`; `spec.y` or the first
    /// numeric column; the largest value when an id repeats). Sub-techniques are rolled up into
    /// their parent (the parent shows the larger of its own and its subs' values) unless `spec.series`
    /// is `subtechniques`, which lists each sub-technique with a value under its parent.
    pub fn from_frame(
        frame: &Frame,
        spec: &ChartSpec,
        layout: &Layout,
        title: &str,
    ) -> Result<Self, ChartError> {
        let idc = frame.column(spec.x.as_deref().unwrap_or("technique_id"), "heatmap")?;
        let vc = frame.value_column_except(spec.y.as_deref(), "heatmap", &[idc])?;
        let show_subs = spec.series.as_deref() == Some("subtechniques");
        let mut values: HashMap<String, f64> = HashMap::new();
        for (id, v) in frame.strings(idc).into_iter().zip(frame.numbers(vc)) {
            if let Some(v) = v {
                let e = values.entry(id.trim().to_ascii_uppercase()).or_insert(v);
                *e = e.max(v);
            }
        }
        let known: HashMap<&str, &Technique> = layout
            .techniques
            .iter()
            .map(|t| (t.id.as_str(), t))
            .collect();
        let unplaced = values
            .keys()
            .filter(|k| !known.contains_key(k.as_str()))
            .count();
        // Roll sub-technique values up into parents.
        let mut rolled: HashMap<&str, f64> = HashMap::new();
        for (id, v) in &values {
            let Some(t) = known.get(id.as_str()) else {
                continue;
            };
            let key = if show_subs {
                t.id.as_str()
            } else {
                parent(&t.id)
            };
            let e = rolled.entry(key).or_insert(*v);
            *e = e.max(*v);
        }
        let mut columns = Vec::new();
        for tactic in &layout.tactics {
            let mut parents: Vec<&Technique> = layout
                .techniques
                .iter()
                .filter(|t| !t.id.contains('.') && t.tactics.contains(&tactic.shortname))
                .collect();
            parents.sort_by(|a, b| a.name.cmp(&b.name));
            let mut cells = Vec::new();
            for p in parents {
                cells.push(Cell {
                    id: p.id.clone(),
                    name: p.name.clone(),
                    value: rolled.get(p.id.as_str()).copied(),
                    sub: false,
                });
                if show_subs {
                    let mut subs: Vec<&Technique> = layout
                        .techniques
                        .iter()
                        .filter(|t| {
                            parent(&t.id) == p.id
                                && t.id != p.id
                                && t.tactics.contains(&tactic.shortname)
                                && rolled.contains_key(t.id.as_str())
                        })
                        .collect();
                    subs.sort_by(|a, b| a.name.cmp(&b.name));
                    cells.extend(subs.into_iter().map(|s| Cell {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        value: rolled.get(s.id.as_str()).copied(),
                        sub: true,
                    }));
                }
            }
            columns.push((tactic.clone(), cells));
        }
        let placed: Vec<f64> = columns
            .iter()
            .flat_map(|c| c.1.iter().filter_map(|c| c.value))
            .collect();
        let hi = placed.iter().copied().fold(f64::MIN, f64::max);
        let lo = placed.iter().copied().fold(f64::MAX, f64::min);
        let (lo, hi) = if placed.is_empty() {
            (0.0, 1.0)
        } else {
            (lo.min(0.0), hi)
        };
        Ok(Self {
            title: title.to_string(),
            value_name: frame.names[vc].clone(),
            columns,
            lo,
            hi,
            unplaced,
        })
    }

    /// Cells coloured.
    pub fn coloured(&self) -> usize {
        self.columns
            .iter()
            .map(|c| c.1.iter().filter(|c| c.value.is_some()).count())
            .sum()
    }
}

const COL_W: i32 = 148;
const CELL_H: i32 = 30;
const HEAD_H: i32 = 120;
const MARGIN: i32 = 16;

impl Drawable for Matrix {
    fn size(&self) -> (u32, u32) {
        let rows = self.columns.iter().map(|c| c.1.len()).max().unwrap_or(0) as i32;
        let w = MARGIN * 2 + COL_W * self.columns.len().max(4) as i32;
        let h = HEAD_H + rows * CELL_H + MARGIN * 2 + 30;
        (w as u32, h as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<usize, String> {
        root.fill(&WHITE).map_err(draw_err)?;
        let title = (FONT, 22).into_font().style(FontStyle::Bold).color(&BLACK);
        root.draw(&Text::new(self.title.clone(), (MARGIN, MARGIN), title))
            .map_err(draw_err)?;
        let width = self.size().0 as i32;
        heat_legend(
            root,
            (width - MARGIN - 260, MARGIN + 18),
            260,
            self.lo,
            self.hi,
            &self.value_name,
        )?;
        let head = (FONT, 13).into_font().style(FontStyle::Bold).color(&BLACK);
        let small = (FONT, 11).into_font().color(&RGBColor(0x55, 0x55, 0x55));
        let span = (self.hi - self.lo).max(1e-12);
        let mut marks = 0;
        for (c, (tactic, cells)) in self.columns.iter().enumerate() {
            let x = MARGIN + c as i32 * COL_W;
            let y = 70;
            // Tactic name over up to two lines.
            let (l1, l2) = wrap2(&tactic.name, 19);
            root.draw(&Text::new(l1, (x + 4, y), head.clone()))
                .map_err(draw_err)?;
            if !l2.is_empty() {
                root.draw(&Text::new(clip(&l2, 19), (x + 4, y + 16), head.clone()))
                    .map_err(draw_err)?;
            }
            let with = cells.iter().filter(|c| c.value.is_some()).count();
            root.draw(&Text::new(
                format!(
                    "{with}/{} techniques",
                    cells.iter().filter(|c| !c.sub).count()
                ),
                (x + 4, y + 34),
                small.clone(),
            ))
            .map_err(draw_err)?;
            for (r, cell) in cells.iter().enumerate() {
                let y0 = HEAD_H + r as i32 * CELL_H;
                let indent = if cell.sub { 10 } else { 0 };
                let (fill, ink) = match cell.value {
                    Some(v) => {
                        marks += 1;
                        let t = (v - self.lo) / span;
                        (heat(0.08 + 0.92 * t), if t > 0.55 { WHITE } else { BLACK })
                    }
                    None => (RGBColor(0xF3, 0xF3, 0xF3), RGBColor(0x88, 0x88, 0x88)),
                };
                root.draw(&Rectangle::new(
                    [(x + 2 + indent, y0 + 1), (x + COL_W - 2, y0 + CELL_H - 1)],
                    fill.filled(),
                ))
                .map_err(draw_err)?;
                let id_style = (FONT, 10).into_font().style(FontStyle::Bold).color(&ink);
                let name_style = (FONT, 10).into_font().color(&ink);
                root.draw(&Text::new(
                    cell.id.clone(),
                    (x + 5 + indent, y0 + 3),
                    id_style,
                ))
                .map_err(draw_err)?;
                root.draw(&Text::new(
                    clip(&cell.name, if cell.sub { 21 } else { 23 }),
                    (x + 5 + indent, y0 + 15),
                    name_style,
                ))
                .map_err(draw_err)?;
            }
        }
        if self.unplaced > 0 {
            let h = self.size().1 as i32;
            root.draw(&Text::new(
                format!(
                    "{} technique id(s) in the result are not in this matrix (other domain or revoked)",
                    self.unplaced
                ),
                (MARGIN, h - MARGIN - 12),
                small,
            ))
            .map_err(draw_err)?;
        }
        Ok(marks)
    }
}

/// Split `s` into two lines of at most `n` characters at a space.
fn wrap2(s: &str, n: usize) -> (String, String) {
    if s.chars().count() <= n {
        return (s.to_string(), String::new());
    }
    let cut = s
        .char_indices()
        .filter(|(i, c)| *c == ' ' && *i <= n)
        .map(|(i, _)| i)
        .next_back()
        .unwrap_or(n.min(s.len()));
    let cut = if s.is_char_boundary(cut) { cut } else { 0 };
    (s[..cut].to_string(), s[cut..].trim().to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn layout() -> Layout {
        let t = |id: &str, name: &str, tactics: &[&str]| Technique {
            id: id.into(),
            name: name.into(),
            tactics: tactics.iter().map(|s| s.to_string()).collect(),
        };
        Layout {
            domain: "enterprise".into(),
            tactics: vec![
                Tactic {
                    shortname: "execution".into(),
                    name: "Execution".into(),
                },
                Tactic {
                    shortname: "persistence".into(),
                    name: "Persistence".into(),
                },
            ],
            techniques: vec![
                t("T1059", "Command and Scripting Interpreter", &["execution"]),
                t("T1059.001", "PowerShell", &["execution"]),
                t("T1053", "Scheduled Task/Job", &["execution", "persistence"]),
                t(
                    "T1547",
                    "Boot or Logon Autostart Execution",
                    &["persistence"],
                ),
            ],
        }
    }

    fn frame(rows: &[(&str, f64)]) -> Frame {
        let schema = Arc::new(Schema::new(vec![
            Field::new("technique_id", DataType::Utf8, false),
            Field::new("score", DataType::Float64, false),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap();
        Frame::new(&schema, &[b])
    }

    #[test]
    fn rolls_up_and_places_cells() {
        let f = frame(&[("T1059.001", 5.0), ("T1053", 2.0), ("T9999", 1.0)]);
        let m = Matrix::from_frame(
            &f,
            &ChartSpec::of(super::super::ChartKind::Heatmap),
            &layout(),
            "t",
        )
        .unwrap();
        // T1059 (rolled up from .001) + T1053 under execution + T1053 under persistence.
        assert_eq!(m.coloured(), 3);
        assert_eq!(m.unplaced, 1);
        let exec = &m.columns[0].1;
        assert_eq!(exec.len(), 2, "sub-techniques rolled up, not listed");
        assert_eq!(
            exec.iter().find(|c| c.id == "T1059").unwrap().value,
            Some(5.0)
        );
        let mut spec = ChartSpec::of(super::super::ChartKind::Heatmap);
        spec.series = Some("subtechniques".into());
        let m = Matrix::from_frame(&f, &spec, &layout(), "t").unwrap();
        let exec = &m.columns[0].1;
        assert_eq!(exec.len(), 3, "PowerShell listed under its parent");
        assert!(exec.iter().any(|c| c.sub && c.id == "T1059.001"));
        assert_eq!(exec.iter().find(|c| c.id == "T1059").unwrap().value, None);
        assert_eq!(
            wrap2("Command and Control", 10),
            ("Command".into(), "and Control".into())
        );
    }
}
