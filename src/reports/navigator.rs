//! ATT&CK Navigator layer 4.5 from any result with a `technique_id` column (plus optional `score`,
//! `tactic`, `comment`/`technique_name`): what TRAM, MISP and OpenCTI users import.

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use serde_json::{json, Value};

use super::{Dataset, ReportError};
use crate::feeds::column_strings;

fn numbers(b: &RecordBatch, i: usize) -> Vec<Option<f64>> {
    match arrow::compute::cast(b.column(i), &DataType::Float64) {
        Ok(a) => {
            let a = arrow::array::AsArray::as_primitive::<arrow::datatypes::Float64Type>(&a);
            (0..a.len())
                .map(|r| a.is_valid(r).then(|| a.value(r)))
                .collect()
        }
        Err(_) => vec![None; b.num_rows()],
    }
}

/// True for an ATT&CK technique id (T1234 or T1234.567; Mobile/ICS ids have the same shape).
pub fn is_technique_id(s: &str) -> bool {
    let b = s.as_bytes();
    (b.len() == 5 || (b.len() == 9 && b[5] == b'.' && b[6..].iter().all(u8::is_ascii_digit)))
        && b[0] == b'T'
        && b[1..5].iter().all(u8::is_ascii_digit)
}

/// The layer: one entry per (technique, tactic) row, scores summed when a technique repeats, ids that
/// are not ATT&CK technique ids dropped.
/// `platforms` are the domain's platforms: the layer's platform filter shows them all (an empty
/// filter hides every technique in the Navigator, and MITRE's `mitreattack-python` rejects it).
pub fn layer(
    data: &Dataset,
    domain: &str,
    attack_version: &str,
    platforms: &[String],
) -> Result<Value, ReportError> {
    let idx = |n: &str| data.schema.index_of(n).ok();
    let tid = idx("technique_id").ok_or_else(|| ReportError::Navigator {
        name: data.def.name.clone(),
        message: "no technique_id column".into(),
    })?;
    let (score, tactic) = (idx("score"), idx("tactic"));
    let comment = idx("comment").or(idx("technique_name"));
    let mut entries: Vec<(String, Option<String>, f64, Option<String>)> = Vec::new();
    for b in &data.batches {
        let ids = column_strings(b, tid);
        let scores = score.map(|i| numbers(b, i));
        let tactics = tactic.map(|i| column_strings(b, i));
        let comments = comment.map(|i| column_strings(b, i));
        for r in 0..b.num_rows() {
            let Some(id) = ids[r].as_deref().filter(|i| is_technique_id(i)) else {
                continue;
            };
            let s = scores.as_ref().and_then(|v| v[r]).unwrap_or(1.0);
            // Navigator keys tactics by shortname ("defense-evasion").
            let t = tactics
                .as_ref()
                .and_then(|v| v[r].clone())
                .map(|t| t.to_ascii_lowercase().replace(' ', "-"));
            let c = comments.as_ref().and_then(|v| v[r].clone());
            match entries.iter_mut().find(|e| e.0 == id && e.1 == t) {
                Some(e) => e.2 += s,
                None => entries.push((id.to_string(), t, s, c)),
            }
        }
    }
    let max = entries.iter().map(|e| e.2).fold(0.0f64, f64::max);
    let techniques: Vec<Value> = entries
        .iter()
        .map(|(id, tactic, score, c)| {
            let mut v = json!({
                "techniqueID": id, "score": (score * 1000.0).round() / 1000.0,
                "color": "", "comment": c.clone().unwrap_or_default(),
                "enabled": true, "metadata": [], "links": [], "showSubtechniques": false
            });
            if let Some(t) = tactic {
                v["tactic"] = json!(t);
            }
            v
        })
        .collect();
    let major = attack_version.split('.').next().unwrap_or(attack_version);
    // The gradient's bounds are integers in the Navigator's own tooling (mitreattack-python
    // rejects 2.5); scores keep their decimals.
    let max_value = (max.ceil() as i64).max(1);
    let mut layer = json!({
        "name": data.def.title,
        "versions": {"attack": major, "navigator": "5.1.0", "layer": "4.5"},
        "domain": format!("{domain}-attack"),
        "description": data.def.description,
        "sorting": 3,
        "layout": {"layout": "side", "aggregateFunction": "average", "showID": true, "showName": true,
                   "showAggregateScores": false, "countUnscored": false, "expandedSubtechniques": "annotated"},
        "hideDisabled": false,
        "techniques": techniques,
        // Two stops: the Navigator's tooling needs at least one integer step between stops, and
        // scores of 0..1 have only one.
        "gradient": {"colors": ["#ffffffff", "#e60d0dff"], "minValue": 0, "maxValue": max_value},
        "legendItems": [
            {"label": "no evidence", "color": "#ffffffff"},
            {"label": format!("strongest ({max:.3})"), "color": "#e60d0dff"}
        ],
        "metadata": [{"name": "generated_by", "value": concat!("threatlake ", env!("CARGO_PKG_VERSION"))}],
        "links": [],
        "showTacticRowBackground": false,
        "tacticRowBackground": "#dddddd",
        "selectTechniquesAcrossTactics": true,
        "selectSubtechniquesWithParent": false,
        "selectVisibleTechniques": false
    });
    if !platforms.is_empty() {
        layer["filters"] = json!({ "platforms": platforms });
    }
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn technique_ids() {
        for ok in ["T1059", "T1059.001", "T0855"] {
            assert!(is_technique_id(ok), "{ok}");
        }
        for bad in [
            "t1059",
            "T105",
            "T1059.01",
            "TA0001",
            "T1059.001x",
            "<script>",
        ] {
            assert!(!is_technique_id(bad), "{bad}");
        }
    }
}
