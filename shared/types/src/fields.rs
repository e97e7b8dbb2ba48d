//! Field registry: every field path a rule reads gets a slot, so events are
//! decoded once into a slot array and conditions read slots by index.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

/// Index of a field slot in [`crate::Event`].
pub type FieldId = u32;

/// Append-only map from dotted field path to slot.
#[derive(Debug, Default, Clone)]
pub struct FieldRegistry {
    paths: Vec<Box<str>>,
    by_path: HashMap<Box<str>, FieldId>,
    /// Every proper prefix of a registered dotted path (`payload` for
    /// `payload.sku`): the decoder descends into these objects only.
    prefixes: HashSet<Box<str>>,
}

impl FieldRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Slot of `path`, registering it if new.
    pub fn intern(&mut self, path: &str) -> FieldId {
        if let Some(id) = self.by_path.get(path) {
            return *id;
        }
        let id = self.paths.len() as FieldId;
        self.paths.push(path.into());
        self.by_path.insert(path.into(), id);
        let mut idx = 0;
        while let Some(pos) = path[idx..].find('.') {
            self.prefixes.insert(path[..idx + pos].into());
            idx += pos + 1;
        }
        id
    }

    pub fn get(&self, path: &str) -> Option<FieldId> {
        self.by_path.get(path).copied()
    }

    pub fn path(&self, id: FieldId) -> &str {
        &self.paths[id as usize]
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub(crate) fn is_prefix(&self, path: &str) -> bool {
        !self.prefixes.is_empty() && self.prefixes.contains(path)
    }
}
