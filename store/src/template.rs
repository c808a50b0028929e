//! Templates: a workspace marked as a read-mostly source (`workspaces/W/template`,
//! `FORMAT.md`, "Template"). A writer mount of a template is refused unless it says it edits
//! the template; read-only mounts and forks are what a template is for: "start from a warm
//! tree" is `owsfs fork TEMPLATE NEW`, whose first generation shares the template's tree and
//! carries its access list, so the fork's first mount fetches the template's working set first.

use serde::{Deserialize, Serialize};

use crate::backend::Store;
use crate::error::Result;
use crate::generation::{Workspace, seal_json, unseal_json};

pub const TEMPLATE_VERSION: u64 = 1;

/// The mark of a template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMark {
    /// When it was marked (ms since the epoch, the store's clock).
    pub since_unix_ms: u64,
    /// Who marked it (a host and process, for people).
    pub by: String,
}

impl Workspace {
    fn template_key(&self) -> String {
        format!("workspaces/{}/template", self.name())
    }

    /// The workspace's template mark, if it is one.
    pub fn template(&self) -> Result<Option<TemplateMark>> {
        let key = self.template_key();
        match self.store().get(&key) {
            Ok(b) => unseal_json("owsfs-template", TEMPLATE_VERSION, &key, &b).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Marks the workspace a template (again: the first mark stays).
    pub fn mark_template(&self, by: &str) -> Result<TemplateMark> {
        if let Some(m) = self.template()? {
            return Ok(m);
        }
        let m = TemplateMark {
            since_unix_ms: self.store().clock().unix_ms(),
            by: by.to_string(),
        };
        self.store().put(
            &self.template_key(),
            seal_json("owsfs-template", TEMPLATE_VERSION, "template", &m)?,
        )?;
        Ok(m)
    }

    /// Makes it an ordinary workspace again; false when it was not a template.
    pub fn unmark_template(&self) -> Result<bool> {
        if self.template()?.is_none() {
            return Ok(false);
        }
        self.store().delete(&self.template_key())?;
        Ok(true)
    }
}

/// The templates of a store, by name.
pub fn templates(store: &Store) -> Result<Vec<(String, TemplateMark)>> {
    let mut out = Vec::new();
    for key in store.list("workspaces/")? {
        let mut parts = key.split('/');
        if let (Some(_), Some(name), Some("template"), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
            && let Some(ws) = Workspace::open_existing(store, name)?
            && let Some(m) = ws.template()?
        {
            out.push((name.to_string(), m));
        }
    }
    Ok(out)
}
