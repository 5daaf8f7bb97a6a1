//! Arrow kernels behind the SQL functions: `&StringArray` in, `ArrayRef` out, engine-agnostic.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};

/// Orders ATT&CK release numbers numerically: `"9.0" < "18.1"`, which string comparison gets wrong.
///
/// `major.minor[.patch]` becomes `major * 1_000_000 + minor * 1_000 + patch`; text that is not a
/// version (or NULL) gives NULL so it sorts apart instead of silently ranking as zero.
pub fn attack_version_key(input: &StringArray) -> ArrayRef {
    let out: Int64Array = input.iter().map(|v| v.and_then(version_key)).collect();
    Arc::new(out)
}

/// The numeric sort key of one version string; see [`attack_version_key`].
pub fn version_key(version: &str) -> Option<i64> {
    let mut parts = version.trim().trim_start_matches(['v', 'V']).split('.');
    let mut key = 0i64;
    let mut seen = 0;
    for scale in [1_000_000i64, 1_000, 1] {
        match parts.next() {
            Some(p) => {
                let n: i64 = p.parse().ok()?;
                if !(0..1000).contains(&n) {
                    return None;
                }
                key += n * scale;
                seen += 1;
            }
            None => break,
        }
    }
    if seen == 0 || parts.next().is_some() {
        return None;
    }
    Some(key)
}

/// The parent technique of an ATT&CK id: `T1059.001 -> T1059`, `T1059 -> T1059`.
///
/// Anything that is not a technique id (`T` + 4 digits, optional `.` + 3 digits) gives NULL.
pub fn technique_parent(input: &StringArray) -> ArrayRef {
    let out: StringArray = input.iter().map(|v| v.and_then(parent_of)).collect();
    Arc::new(out)
}

/// The parent id of one technique id; see [`technique_parent`].
pub fn parent_of(id: &str) -> Option<&str> {
    let id = id.trim();
    let b = id.as_bytes();
    let is_digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    match b.len() {
        5 if b[0] == b'T' && is_digits(&b[1..5]) => Some(id),
        9 if b[0] == b'T' && is_digits(&b[1..5]) && b[5] == b'.' && is_digits(&b[6..9]) => {
            Some(&id[..5])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;

    #[test]
    fn version_keys_order_numerically() {
        assert!(version_key("9.0").unwrap() < version_key("18.1").unwrap());
        assert!(version_key("18.1").unwrap() < version_key("18.10").unwrap());
        assert_eq!(version_key("18"), Some(18_000_000));
        assert_eq!(version_key("v17.1.2"), Some(17_001_002));
        assert_eq!(version_key(""), None);
        assert_eq!(version_key("18.x"), None);
        assert_eq!(version_key("1.2.3.4"), None);
    }

    #[test]
    fn version_kernel_keeps_nulls() {
        let a = StringArray::from(vec![Some("18.1"), None, Some("junk")]);
        let out = attack_version_key(&a);
        let out = out.as_primitive::<Int64Type>();
        assert_eq!(out.value(0), 18_001_000);
        assert!(out.is_null(1));
        assert!(out.is_null(2));
        assert_eq!(out.null_count(), 2);
    }

    #[test]
    fn parents() {
        assert_eq!(parent_of("T1059.001"), Some("T1059"));
        assert_eq!(parent_of("T1059"), Some("T1059"));
        assert_eq!(parent_of("T105"), None);
        assert_eq!(parent_of("TA0002"), None);
        assert_eq!(parent_of("T1059.01"), None);
        let a = StringArray::from(vec![Some("T1003.001"), None, Some("x")]);
        let out = technique_parent(&a);
        let out = out.as_string::<i32>();
        assert_eq!(out.value(0), "T1003");
        assert!(out.is_null(1) && out.is_null(2));
    }
}
