//! Persistent mdev definitions in mdevctl's format, so that mdevctl and this tool
//! read and write the same files: `/etc/mdevctl.d/<parent>/<uuid>` holding
//! `{"mdev_type": "...", "start": "auto"|"manual", "attrs": [{"name": "value"}]}`.
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory), so a
//! crash leaves the old definition or the new one, never half of one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{Error, Result};
use vfio_manager_api::ids::{parse_uuid, MdevParent, MdevTypeId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    Auto,
    Manual,
}

/// What mdevctl keeps in one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub mdev_type: MdevTypeId,
    pub start: Start,
    /// Vendor attributes written after creation, in order: `[{"name": "value"}]`.
    #[serde(default)]
    pub attrs: Vec<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Definition {
    pub uuid: Uuid,
    pub parent: MdevParent,
    #[serde(flatten)]
    pub config: Config,
}

/// A file that is not a definition, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub path: PathBuf,
    pub reason: String,
}

/// The definitions directory (`<root>/etc/mdevctl.d`).
pub struct Store {
    dir: PathBuf,
}

/// mdevctl keeps its callout and notifier scripts beside the parents.
const NOT_PARENTS: &[&str] = &["scripts.d"];

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

impl Store {
    pub fn new(root: &Path) -> Self {
        Store {
            dir: root.join("etc/mdevctl.d"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, parent: &MdevParent, uuid: &Uuid) -> PathBuf {
        self.dir.join(parent).join(uuid.to_string())
    }

    /// Every definition, and the files that are not one (listed, never fatal: one
    /// bad file must not hide the others).
    pub fn list(&self) -> (Vec<Definition>, Vec<Problem>) {
        let mut defs = Vec::new();
        let mut problems = Vec::new();
        for pdir in entries(&self.dir).into_iter().filter(|p| p.is_dir()) {
            let Some(parent) = pdir
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if NOT_PARENTS.contains(&parent.as_str()) {
                continue;
            }
            for file in entries(&pdir) {
                let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with('.') {
                    continue; // our own temporary files
                }
                match Self::read(&file, name, &parent) {
                    Ok(d) => defs.push(d),
                    Err(reason) => problems.push(Problem { path: file, reason }),
                }
            }
        }
        (defs, problems)
    }

    fn read(file: &Path, name: &str, parent: &str) -> std::result::Result<Definition, String> {
        let parent = MdevParent::new(parent).map_err(|e| e.to_string())?;
        let uuid = parse_uuid(name).map_err(|e| e.to_string())?;
        let text = fs::read_to_string(file).map_err(|e| e.to_string())?;
        let config: Config =
            serde_json::from_str(&text).map_err(|e| format!("not mdevctl JSON: {e}"))?;
        Ok(Definition {
            uuid,
            parent,
            config,
        })
    }

    pub fn get(&self, uuid: &Uuid) -> Option<Definition> {
        self.list().0.into_iter().find(|d| d.uuid == *uuid)
    }

    /// Writes a definition atomically. A UUID defined under another parent is refused.
    pub fn write(&self, def: &Definition) -> Result<()> {
        if let Some(other) = self.get(&def.uuid).filter(|d| d.parent != def.parent) {
            return Err(Error::refused(
                def.uuid,
                format!("it is already defined on parent {}", other.parent),
                format!("undefine it first (`vfctl mdev undefine {}`)", def.uuid),
            ));
        }
        let pdir = self.dir.join(&def.parent);
        fs::create_dir_all(&pdir)
            .map_err(|e| Error::io(&pdir, "cannot create the directory", e))?;
        let path = self.path(&def.parent, &def.uuid);
        let tmp = pdir.join(format!(".{}.tmp", def.uuid));
        let mut text = serde_json::to_string_pretty(&def.config).expect("definitions serialise");
        text.push('\n');
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&pdir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(&path, "cannot write the definition", e)
        })
    }

    /// Removes a definition; `false` if there was none.
    pub fn remove(&self, uuid: &Uuid) -> Result<bool> {
        let Some(def) = self.get(uuid) else {
            return Ok(false);
        };
        let path = self.path(&def.parent, uuid);
        fs::remove_file(&path).map_err(|e| Error::io(&path, "cannot remove the definition", e))?;
        Ok(true)
    }
}

/// mdevctl's `list --dumpjson` shape: `[{"<parent>": [{"<uuid>": {config}}]}]`.
pub fn dump_json(defs: &[Definition]) -> Value {
    let mut by_parent: Map<String, Value> = Map::new();
    for d in defs {
        let entry = serde_json::json!({ d.uuid.to_string(): d.config });
        by_parent
            .entry(d.parent.to_string())
            .or_insert_with(|| Value::Array(vec![]))
            .as_array_mut()
            .expect("array")
            .push(entry);
    }
    Value::Array(
        by_parent
            .into_iter()
            .map(|(k, v)| serde_json::json!({ k: v }))
            .collect(),
    )
}
