use serde::Serialize;

use crate::Severity;

/// A lint rule: its id (used by `-- belay:allow=<id>`), default severity, what it flags and
/// the safe rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub id: &'static str,
    pub severity: Severity,
    pub summary: &'static str,
    pub hint: &'static str,
}

/// Every rule. Some findings use a lower severity than the rule's default when the risk
/// is uncertain (e.g. a type change that may be binary-coercible); this table lists the
/// usual one.
pub const RULES: &[Rule] = &[
    Rule {
        id: "parse-error",
        severity: Severity::Error,
        summary: "the SQL does not parse",
        hint: "fix the syntax; belay lints with PostgreSQL's own parser",
    },
    Rule {
        id: "constraint-not-valid",
        severity: Severity::Error,
        summary: "a FOREIGN KEY or CHECK constraint added to an existing table is validated at once, scanning the table under lock",
        hint: "ADD CONSTRAINT … NOT VALID, then ALTER TABLE … VALIDATE CONSTRAINT … in a later migration (or a separate transaction): validation takes only SHARE UPDATE EXCLUSIVE",
    },
    Rule {
        id: "create-index-concurrently",
        severity: Severity::Error,
        summary: "CREATE INDEX without CONCURRENTLY blocks writes to the table for the whole build",
        hint: "CREATE INDEX CONCURRENTLY in a no-transaction migration (-- belay:no-transaction)",
    },
    Rule {
        id: "drop-index-concurrently",
        severity: Severity::Error,
        summary: "DROP INDEX without CONCURRENTLY takes ACCESS EXCLUSIVE on the table",
        hint: "DROP INDEX CONCURRENTLY in a no-transaction migration",
    },
    Rule {
        id: "reindex-concurrently",
        severity: Severity::Error,
        summary: "REINDEX without CONCURRENTLY blocks writes, and reads that use the index",
        hint: "REINDEX … CONCURRENTLY in a no-transaction migration",
    },
    Rule {
        id: "detach-partition-concurrently",
        severity: Severity::Error,
        summary: "DETACH PARTITION without CONCURRENTLY takes ACCESS EXCLUSIVE on the parent table",
        hint: "ALTER TABLE … DETACH PARTITION … CONCURRENTLY in a no-transaction migration (PostgreSQL ≥ 14)",
    },
    Rule {
        id: "concurrently-in-transaction",
        severity: Severity::Error,
        summary: "CONCURRENTLY cannot run inside a transaction block",
        hint: "put the statement in its own migration marked -- belay:no-transaction",
    },
    Rule {
        id: "volatile-default",
        severity: Severity::Error,
        summary: "ADD COLUMN with a volatile default (or serial/identity) rewrites the whole table under ACCESS EXCLUSIVE",
        hint: "add the column without a default (or with a constant one), set the default separately, and backfill existing rows in batches (belay backfill)",
    },
    Rule {
        id: "stored-generated-column",
        severity: Severity::Error,
        summary: "ADD COLUMN … GENERATED ALWAYS AS (…) STORED rewrites the whole table under ACCESS EXCLUSIVE",
        hint: "add a plain column, fill it with a trigger plus a batched backfill; or use a VIRTUAL generated column (PostgreSQL ≥ 18)",
    },
    Rule {
        id: "column-type-rewrite",
        severity: Severity::Error,
        summary: "ALTER COLUMN … TYPE rewrites the table (and its indexes) under ACCESS EXCLUSIVE unless the change is binary-coercible",
        hint: "add a new column of the new type, dual-write with a trigger, backfill in batches, switch readers, then drop the old column",
    },
    Rule {
        id: "set-not-null",
        severity: Severity::Warning,
        summary: "SET NOT NULL scans the whole table under ACCESS EXCLUSIVE unless a validated CHECK (col IS NOT NULL) exists",
        hint: "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID; VALIDATE CONSTRAINT c; then SET NOT NULL (no scan, PostgreSQL ≥ 12) and drop the CHECK",
    },
    Rule {
        id: "unique-without-index",
        severity: Severity::Error,
        summary: "ADD UNIQUE / PRIMARY KEY builds its index while holding ACCESS EXCLUSIVE",
        hint: "CREATE UNIQUE INDEX CONCURRENTLY first, then ADD CONSTRAINT … UNIQUE (or PRIMARY KEY) USING INDEX",
    },
    Rule {
        id: "unbatched-dml",
        severity: Severity::Error,
        summary: "UPDATE/DELETE of a whole table in one transaction locks every row and bloats the table",
        hint: "update in primary-key batches, each its own short transaction (belay backfill --table T --set … --batch N)",
    },
    Rule {
        id: "rename",
        severity: Severity::Error,
        summary: "renaming a table or column breaks the application version still running during the deploy",
        hint: "expand/contract: add the new name (column, or a view for a table), dual-write, move readers, drop the old name in a later release",
    },
    Rule {
        id: "drop-without-data-undo",
        severity: Severity::Warning,
        summary: "DROP COLUMN/TABLE destroys data that no undo or snapshot brings back",
        hint: "stop using it first, then drop in a later release with a data snapshot (backup of the affected tables) or an undo that restores the data",
    },
    Rule {
        id: "vacuum-full",
        severity: Severity::Error,
        summary: "VACUUM FULL rewrites the table under ACCESS EXCLUSIVE",
        hint: "use plain VACUUM, or pg_repack / pg_squeeze to compact online",
    },
    Rule {
        id: "cluster",
        severity: Severity::Error,
        summary: "CLUSTER rewrites the table under ACCESS EXCLUSIVE",
        hint: "use pg_repack --order-by to reorder online, or do it in a maintenance window",
    },
    Rule {
        id: "truncate-cascade",
        severity: Severity::Error,
        summary: "TRUNCATE … CASCADE silently empties every table that references this one",
        hint: "truncate the referencing tables explicitly (or delete in batches), naming each",
    },
    Rule {
        id: "enum-add-value-in-transaction",
        severity: Severity::Error,
        summary: "a value added with ALTER TYPE … ADD VALUE cannot be used before its transaction commits",
        hint: "add the enum value in its own migration (or -- belay:no-transaction) and use it in a later one",
    },
    Rule {
        id: "missing-undo",
        severity: Severity::Warning,
        summary: "the migration has no undo script",
        hint: "write an undo (V<n>__x.sql + U<n>__x.sql, x.down.sql, or down.sql) so belay can roll back",
    },
];

/// The rule with this id (`parse-error` for an unknown id; ids used here are constants).
pub fn rule(id: &str) -> &'static Rule {
    RULES.iter().find(|r| r.id == id).unwrap_or(&RULES[0])
}
