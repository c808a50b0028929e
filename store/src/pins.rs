//! Pins: a read-only mount of an older generation holds it against GC while it runs
//! (`FORMAT.md`, "Pin"). A pin names the generation and carries its root, so GC keeps the
//! tree even if a run that listed before the pin pruned the record; it expires unless
//! renewed, so a mount that died stops holding anything.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::generation::{GenNumber, Workspace, seal_json, unseal_json};
use crate::pack::BlobRef;

pub const PIN_VERSION: u64 = 1;

/// One pin record `workspaces/W/pins/ID`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub workspace: String,
    pub id: String,
    pub generation: GenNumber,
    pub root: BlobRef,
    /// Who holds it (host and pid), for people.
    pub holder: String,
    /// After this (the pinner's clock), GC ignores and deletes it.
    pub expires_unix_ms: u64,
}

impl Workspace {
    fn pin_key(&self, id: &str) -> String {
        format!("workspaces/{}/pins/{id}", self.name())
    }

    /// Writes (or renews) pin `id` on `generation` (root `root`) for `ttl` from now.
    pub fn pin(
        &self,
        id: &str,
        generation: GenNumber,
        root: BlobRef,
        holder: &str,
        ttl: Duration,
    ) -> Result<Pin> {
        if !crate::generation::valid_workspace_name(id) {
            return Err(StoreError::Invalid(format!("invalid pin id {id:?}")));
        }
        let p = Pin {
            workspace: self.name().to_string(),
            id: id.to_string(),
            generation,
            root,
            holder: holder.to_string(),
            expires_unix_ms: self.store().clock().unix_ms() + ttl.as_millis() as u64,
        };
        self.store().put(
            &self.pin_key(id),
            seal_json("owsfs-pin", PIN_VERSION, "pin", &p)?,
        )?;
        Ok(p)
    }

    /// Removes pin `id` (a missing one is fine).
    pub fn unpin(&self, id: &str) -> Result<()> {
        self.store().delete(&self.pin_key(id))
    }

    /// Every pin, expired or not. A damaged one is an error naming it.
    pub fn list_pins(&self) -> Result<Vec<Pin>> {
        let prefix = format!("workspaces/{}/pins/", self.name());
        let mut out = Vec::new();
        for key in self.store().list(&prefix)? {
            let b = match self.store().get(&key) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            let p: Pin = unseal_json("owsfs-pin", PIN_VERSION, &key, &b)?;
            if p.workspace != self.name() || Some(p.id.as_str()) != key.strip_prefix(&prefix) {
                return Err(StoreError::corrupt(
                    &key,
                    "the pin names another workspace or id",
                ));
            }
            out.push(p);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Store, StoreOptions};
    use crate::clock::ManualClock;
    use crate::ids::{BlobId, PackId};
    use std::sync::Arc;

    #[test]
    fn pins_expire_unless_renewed() {
        let clock = Arc::new(ManualClock::starting_at_unix_ms(1000));
        let store = Store::open(
            &format!("memory://t{:016x}", rand::random::<u64>()),
            StoreOptions {
                clock: clock.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        let ws = Workspace::open_or_create(&store, "w").unwrap();
        let root = BlobRef::plain(BlobId::of(b"x"), PackId([1; 32]), 16, 1);
        let p = ws
            .pin("ro-1", 7, root, "vm pid 1", Duration::from_secs(60))
            .unwrap();
        assert_eq!(p.expires_unix_ms, 61_000);
        clock.advance(Duration::from_secs(30));
        ws.pin("ro-1", 7, root, "vm pid 1", Duration::from_secs(60))
            .unwrap();
        let pins = ws.list_pins().unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].expires_unix_ms, 91_000);
        ws.unpin("ro-1").unwrap();
        assert!(ws.list_pins().unwrap().is_empty());
        assert!(ws.pin("a/b", 1, root, "x", Duration::from_secs(1)).is_err());
    }
}
