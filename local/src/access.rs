//! A generation's access list: the paths its writer opened, most recent first, so the next
//! holder prefetches them first. Stored as a chunk blob: JSON
//! `{"format":"owsfs-access","version":1,"paths":[...]}` (store/FORMAT.md).

use anyhow::bail;
use serde_json::{Value, json};

/// Paths kept in a generation's access list.
pub const ACCESS_LIMIT: usize = 1000;

/// Encodes `paths` (at most [`ACCESS_LIMIT`] are kept); empty when there are none.
pub fn encode(paths: &[String]) -> Vec<u8> {
    if paths.is_empty() {
        return Vec::new();
    }
    let paths = &paths[..paths.len().min(ACCESS_LIMIT)];
    serde_json::to_vec(&json!({"format": "owsfs-access", "version": 1, "paths": paths}))
        .unwrap_or_default()
}

/// Decodes an access list blob (already verified by hash).
pub fn decode(data: &[u8]) -> anyhow::Result<Vec<String>> {
    let v: Value = serde_json::from_slice(data)?;
    if v["format"] != "owsfs-access" || v["version"] != 1 {
        bail!("unknown access list format");
    }
    Ok(v["paths"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .take(ACCESS_LIMIT)
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        assert!(encode(&[]).is_empty());
        let paths: Vec<String> = (0..ACCESS_LIMIT + 5).map(|i| format!("f{i}")).collect();
        let back = decode(&encode(&paths)).unwrap();
        assert_eq!(back.len(), ACCESS_LIMIT);
        assert_eq!(back[0], "f0");
        assert!(decode(br#"{"format":"other","version":1,"paths":[]}"#).is_err());
    }
}
