//! What earlier scripts of the same run did to the schema, for the scripts after them:
//! the tables they created (and what those were renamed to) and the indexes they created.

use std::collections::BTreeMap;

use pg_query::NodeEnum;
use pg_query::protobuf::ObjectType;

use crate::LintContext;
use crate::analyze::{
    apply_index_effects, created_table, index_effects, lookup, name_list, parsed_statements,
    range_var_name, renamed, sets_search_path,
};

/// A permanent table a `CREATE TABLE` of `rv` makes new (see [`created_table`]): not a
/// temporary one, however written.
fn created_permanent(
    rv: Option<&pg_query::protobuf::RangeVar>,
    if_not_exists: bool,
) -> Option<String> {
    created_table(rv, if_not_exists).filter(|t| {
        !t.split_once('.').is_some_and(|(schema, _)| {
            let schema = schema.to_ascii_lowercase();
            schema == "pg_temp" || schema.starts_with("pg_temp_")
        })
    })
}

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
    ///
    /// Temporary tables are not remembered (belay discards them after each migration, so
    /// a later script's name is the permanent table's), nor `CREATE TABLE IF NOT EXISTS`
    /// (the table may have existed, live, before the run). A script that changes its
    /// `search_path` leaves no unqualified name in the memory: which table it named is
    /// not known.
    pub fn record(&mut self, script: &str, sql: &str) {
        let moved_path = sets_search_path(sql).then(|| (self.tables.clone(), self.indexes.clone()));
        self.record_statements(script, sql);
        if let Some((tables, indexes)) = moved_path {
            let qualified = |n: &str| n.contains('.');
            self.tables
                .retain(|k, v| tables.get(k) == Some(v) || qualified(k));
            self.indexes
                .retain(|k, v| indexes.get(k) == Some(v) || (qualified(k) && qualified(v)));
        }
    }

    fn record_statements(&mut self, script: &str, sql: &str) {
        for node in parsed_statements(sql) {
            apply_index_effects(index_effects(&node), &mut self.indexes);
            match &node {
                NodeEnum::CreateStmt(s) => {
                    if let Some(t) = created_permanent(s.relation.as_ref(), s.if_not_exists) {
                        self.tables.insert(t, script.to_string());
                    }
                }
                NodeEnum::CreateTableAsStmt(s) => {
                    let rel = s.into.as_ref().and_then(|i| i.rel.as_ref());
                    if let Some(t) = created_permanent(rel, s.if_not_exists) {
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
                            } else if let Some((k, _)) = lookup(&self.tables, &new) {
                                // A table from before the run takes the name of one the
                                // run created (moved away first): the name is live again.
                                let k = k.clone();
                                self.tables.remove(&k);
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
                NodeEnum::AlterObjectSchemaStmt(s)
                    if ObjectType::try_from(s.object_type) == Ok(ObjectType::ObjectTable) =>
                {
                    // Moved to another schema: its old name may be taken by a live table.
                    if let Some(old) = range_var_name(s.relation.as_ref())
                        && let Some((k, _)) = lookup(&self.tables, &old)
                    {
                        let k = k.clone();
                        self.tables.remove(&k);
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
