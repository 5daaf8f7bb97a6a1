//! World map: countries coloured by a value. Shapes are Natural Earth's 1:110m Admin-0 countries
//! (public domain) as shipped by the `world-atlas` npm package (TopoJSON, `data/geo/`), decoded with
//! the `topojson` crate; countries in the data are matched by ISO alpha-2/alpha-3 code or name.

use std::collections::HashMap;
use std::sync::LazyLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{clip, draw_err, heat, heat_legend, ChartError, ChartSpec, Drawable, Frame, FONT};

/// One country outline.
pub struct Country {
    /// ISO 3166-1 numeric code ("840"), as in Natural Earth.
    pub id: String,
    /// Natural Earth name.
    pub name: String,
    /// Outer rings, as (longitude, latitude).
    pub rings: Vec<Vec<(f64, f64)>>,
}

static COUNTRIES: LazyLock<Vec<Country>> = LazyLock::new(|| {
    let text = include_str!("../../data/geo/countries-110m.json");
    let topo: topojson::TopoJson = text.parse().expect("bundled TopoJSON parses");
    let topojson::TopoJson::Topology(topo) = topo else {
        panic!("bundled TopoJSON is a topology")
    };
    let fc = topojson::to_geojson(&topo, "countries").expect("bundled TopoJSON has countries");
    fc.features
        .into_iter()
        .filter_map(|f| {
            let id = match f.id? {
                geojson::feature::Id::String(s) => s,
                geojson::feature::Id::Number(n) => n.to_string(),
            };
            let name = f
                .properties
                .as_ref()
                .and_then(|p| p.get("name"))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            let polys = match f.geometry?.value {
                geojson::Value::Polygon(p) => vec![p],
                geojson::Value::MultiPolygon(mp) => mp,
                _ => return None,
            };
            let rings = polys
                .into_iter()
                .filter_map(|p| p.into_iter().next())
                .map(|ring| ring.into_iter().map(|pt| (pt[0], pt[1])).collect())
                .collect();
            Some(Country { id, name, rings })
        })
        // Antarctica takes a fifth of an equirectangular map and no intel targets it.
        .filter(|c| c.id != "010")
        .collect()
});

/// The bundled country outlines.
pub fn countries() -> &'static [Country] {
    &COUNTRIES
}

/// Names that intel feeds use but neither Natural Earth nor ISO spell that way.
const ALIASES: &[(&str, &str)] = &[
    ("united states", "840"),
    ("usa", "840"),
    ("united states of america", "840"),
    ("uk", "826"),
    ("united kingdom", "826"),
    ("great britain", "826"),
    ("russia", "643"),
    ("south korea", "410"),
    ("korea, republic of", "410"),
    ("north korea", "408"),
    ("iran", "364"),
    ("syria", "760"),
    ("vietnam", "704"),
    ("taiwan", "158"),
    ("czech republic", "203"),
    ("czechia", "203"),
    ("bolivia", "068"),
    ("venezuela", "862"),
    ("tanzania", "834"),
    ("laos", "418"),
    ("moldova", "498"),
];

/// The numeric country code for an ISO alpha-2/alpha-3 code or an English name.
pub fn country_id(s: &str) -> Option<String> {
    let s = s.trim();
    let pad = |n: u32| format!("{n:03}");
    if s.len() == 2 {
        if let Ok(c) = isocountry::CountryCode::for_alpha2_caseless(s) {
            return Some(pad(c.numeric_id()));
        }
    }
    if s.len() == 3 {
        if let Ok(c) = isocountry::CountryCode::for_alpha3_caseless(s) {
            return Some(pad(c.numeric_id()));
        }
    }
    let lower = s.to_lowercase();
    if let Some((_, id)) = ALIASES.iter().find(|(n, _)| *n == lower) {
        return Some(id.to_string());
    }
    if let Some(c) = countries().iter().find(|c| c.name.to_lowercase() == lower) {
        return Some(c.id.clone());
    }
    isocountry::CountryCode::iter()
        .find(|c| c.name().to_lowercase() == lower)
        .map(|c| pad(c.numeric_id()))
}

/// The map.
pub struct WorldMap {
    /// Title.
    pub title: String,
    /// Legend name.
    pub value_name: String,
    values: HashMap<String, f64>,
    /// Country values that match no shape (unknown names, tiny states absent at 1:110m).
    pub unplaced: Vec<String>,
}

impl WorldMap {
    /// Country from `spec.x` (or the first text column), value from `spec.y` (summed per country).
    pub fn from_frame(frame: &Frame, spec: &ChartSpec, title: &str) -> Result<Self, ChartError> {
        let c = match spec.x.as_deref() {
            Some(x) => frame.column(x, "map")?,
            None => frame
                .first_text_column(&[])
                .ok_or_else(|| ChartError::Data {
                    kind: "map",
                    message: "no text column with country codes or names".into(),
                })?,
        };
        let v = frame.value_column_except(spec.y.as_deref(), "map", &[c])?;
        let mut values: HashMap<String, f64> = HashMap::new();
        let mut unplaced = Vec::new();
        let shapes: std::collections::HashSet<&str> =
            countries().iter().map(|c| c.id.as_str()).collect();
        for (name, val) in frame.strings(c).into_iter().zip(frame.numbers(v)) {
            let Some(val) = val else { continue };
            match country_id(&name).filter(|id| shapes.contains(id.as_str())) {
                Some(id) => *values.entry(id).or_insert(0.0) += val,
                None => {
                    if !unplaced.contains(&name) {
                        unplaced.push(name)
                    }
                }
            }
        }
        Ok(Self {
            title: title.to_string(),
            value_name: frame.names[v].clone(),
            values,
            unplaced,
        })
    }
}

const LAT: (f64, f64) = (-58.0, 84.0);

impl Drawable for WorldMap {
    fn size(&self) -> (u32, u32) {
        (1200, 640)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<usize, String> {
        root.fill(&WHITE).map_err(draw_err)?;
        let title = (FONT, 22).into_font().style(FontStyle::Bold).color(&BLACK);
        root.draw(&Text::new(self.title.clone(), (16, 14), title))
            .map_err(draw_err)?;
        // Colour spans the values present (log scale when they span more than 20x), so close
        // values still differ.
        let hi = self.values.values().copied().fold(f64::MIN, f64::max);
        let lo = self.values.values().copied().fold(f64::MAX, f64::min);
        let (lo, hi) = if self.values.is_empty() {
            (0.0, 1.0)
        } else {
            (lo, hi)
        };
        let log = lo >= 0.0 && hi > 20.0 * lo.max(1.0);
        let f = |v: f64| if log { (1.0 + v.max(0.0)).ln() } else { v };
        let scale = |v: f64| {
            if hi > lo {
                (f(v) - f(lo)) / (f(hi) - f(lo))
            } else {
                1.0
            }
        };
        let legend = if log {
            format!("{} (log scale)", self.value_name)
        } else {
            self.value_name.clone()
        };
        heat_legend(root, (1200 - 16 - 260, 30), 260, lo, hi, &legend)?;
        let (w, h) = (1200.0, 640.0);
        let (top, bottom) = (70.0, if self.unplaced.is_empty() { 10.0 } else { 34.0 });
        let px = |(lon, lat): (f64, f64)| -> (i32, i32) {
            let x = 10.0 + (lon + 180.0) / 360.0 * (w - 20.0);
            let y = top + (LAT.1 - lat) / (LAT.1 - LAT.0) * (h - top - bottom);
            (x.round() as i32, y.round() as i32)
        };
        let mut marks = 0;
        for c in countries() {
            let v = self.values.get(&c.id).copied();
            let fill = match v {
                Some(v) => {
                    marks += 1;
                    heat(0.08 + 0.92 * scale(v))
                }
                None => RGBColor(0xE4, 0xE4, 0xE4),
            };
            for ring in &c.rings {
                // A ring crossing the antimeridian (Russia's Chukotka, Fiji, the Aleutians) is
                // unwrapped eastwards and drawn twice, shifted by 360°: the map edge cuts it.
                let wraps = ring.windows(2).any(|w| (w[0].0 - w[1].0).abs() > 180.0);
                let shifts: &[f64] = if wraps { &[0.0, -360.0] } else { &[0.0] };
                for shift in shifts {
                    let pts: Vec<(i32, i32)> = ring
                        .iter()
                        .map(|&(lon, lat)| {
                            let lon = if wraps && lon < 0.0 { lon + 360.0 } else { lon };
                            px((lon + shift, lat))
                        })
                        .collect();
                    root.draw(&Polygon::new(pts.clone(), fill.filled()))
                        .map_err(draw_err)?;
                    root.draw(&PathElement::new(pts, WHITE.stroke_width(1)))
                        .map_err(draw_err)?;
                }
            }
        }
        if !self.unplaced.is_empty() {
            let note = format!("Not on the map: {}", clip(&self.unplaced.join(", "), 150));
            root.draw(&Text::new(
                note,
                (16, 640 - 24),
                (FONT, 12).into_font().color(&RGBColor(0x55, 0x55, 0x55)),
            ))
            .map_err(draw_err)?;
        }
        Ok(marks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_load_and_names_match() {
        let all = countries();
        assert!(all.len() > 150, "{} countries", all.len());
        assert!(all.iter().all(|c| !c.rings.is_empty()));
        let us = all.iter().find(|c| c.id == "840").expect("USA present");
        assert!(us.rings.len() >= 2, "mainland + Alaska + Hawaii");
        for (s, id) in [
            ("US", "840"),
            ("us", "840"),
            ("DEU", "276"),
            ("Germany", "276"),
            ("United States of America", "840"),
            ("Russia", "643"),
            ("South Korea", "410"),
        ] {
            assert_eq!(country_id(s).as_deref(), Some(id), "{s}");
        }
        assert_eq!(country_id("Atlantis"), None);
        assert_eq!(country_id("<script>"), None);
    }
}
