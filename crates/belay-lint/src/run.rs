//! What earlier scripts of the same run did to the schema, for the scripts after them:
//! the tables they created (and what those were renamed to) and the indexes they created.

use std::collections::BTreeMap;

use pg_query::NodeEnum;
use pg_query::protobuf::ObjectType;

use crate::LintContext;
use crate::analyze::{
    apply_index_effects, index_effects, lookup, name_list, parsed_statements, range_var_name,
    renamed,
};

/// The run's memory across its scripts, in run order. Pure: it reads the scripts' SQL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunMemory {
    /// Table (as written, after renames) → the script that created it.
    tables: BTreeMap<String, String>,
    /// Index (as written, in its table's schema) → its table, for every index created in
    /// the run: a later `DROP INDEX` names only the index, and it is not in the catalog
    /// before the run.
    indexes: BTreeMap<String, String>,
}

impl RunMemory {
    /// Puts what the run knows so far into `ctx` (for the next script).
    pub fn context(&self, ctx: &mut LintContext) {
        ctx.created_earlier_in_run.clone_from(&self.tables);
        ctx.indexes_created_earlier_in_run.clone_from(&self.indexes);
    }

    /// Remembers what `sql` (the script named `script`) does to tables and indexes.
    /// Statements that do not parse are skipped: they have a `parse-error` finding already.
    pub fn record(&mut self, script: &str, sql: &str) {
        for node in parsed_statements(sql) {
            apply_index_effects(index_effects(&node), &mut self.indexes);
            match &node {
                NodeEnum::CreateStmt(s) => {
                    if let Some(t) = range_var_name(s.relation.as_ref()) {
                        self.tables.insert(t, script.to_string());
                    }
                }
                NodeEnum::CreateTableAsStmt(s) => {
                    if let Some(t) = s.into.as_ref().and_then(|i| range_var_name(i.rel.as_ref())) {
                        self.tables.insert(t, script.to_string());
                    }
                }
                NodeEnum::RenameStmt(s) => {
                    let kind = ObjectType::try_from(s.rename_type).unwrap_or(ObjectType::Undefined);
                    let Some(old) = range_var_name(s.relation.as_ref()) else {
                        continue;
                    };
                    let new = renamed(&old, &s.newname);
                    match kind {
                        ObjectType::ObjectTable => {
                            if let Some((k, by)) = lookup(&self.tables, &old) {
                                let (k, by) = (k.clone(), by.clone());
                                self.tables.remove(&k);
                                self.tables.insert(new.clone(), by);
                            }
                            // The indexes follow their table.
                            for t in self.indexes.values_mut() {
                                if crate::analyze::same_relation(t, &old) {
                                    t.clone_from(&new);
                                }
                            }
                        }
                        ObjectType::ObjectIndex => {
                            if let Some((k, t)) = lookup(&self.indexes, &old) {
                                let (k, t) = (k.clone(), t.clone());
                                self.indexes.remove(&k);
                                self.indexes.insert(new, t);
                            }
                        }
                        _ => {}
                    }
                }
                NodeEnum::DropStmt(s) => {
                    let kind = ObjectType::try_from(s.remove_type).unwrap_or(ObjectType::Undefined);
                    for name in name_list(&s.objects) {
                        match kind {
                            ObjectType::ObjectTable => {
                                if let Some((k, _)) = lookup(&self.tables, &name) {
                                    let k = k.clone();
                                    self.tables.remove(&k);
                                }
                                self.indexes
                                    .retain(|_, t| !crate::analyze::same_relation(t, &name));
                            }
                            ObjectType::ObjectIndex => {
                                if let Some((k, _)) = lookup(&self.indexes, &name) {
                                    let k = k.clone();
                                    self.indexes.remove(&k);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
