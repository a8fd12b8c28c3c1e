//! From "who waits for whom" (`pg_blocking_pids`) to blocking trees.
//!
//! - Parallel workers are folded into their leader: `pg_blocking_pids` already names
//!   leaders, and a waiting worker makes its leader a waiter.
//! - A session blocked by two sessions, one of which is itself queued behind the other
//!   (the soft block of a lock queue: A holds, B's ALTER waits on A, C's SELECT waits on A
//!   and on B), is shown only under the nearer one (C under B), so the tree is the queue.
//!   Waiters of independent blockers appear under each.
//! - Roots are blockers that wait for no one; sessions in a cycle (a deadlock before the
//!   detector breaks it) get a root of their own, marked `in_cycle`. Recursion never revisits
//!   a pid on its own path, so cycles cannot loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::LockNode;
use crate::sample::{RawHeld, RawSession, RawWaitedRel, excerpt, ms, wait_event};

/// Lock modes from weakest to strongest.
const MODES: [&str; 8] = [
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
];

fn mode_rank(m: &str) -> usize {
    MODES.iter().position(|x| *x == m).map_or(0, |p| p + 1)
}

struct Graph<'a> {
    rows: BTreeMap<i32, Row<'a>>,
    blocked_by: BTreeMap<i32, BTreeSet<i32>>,
    children: BTreeMap<i32, Vec<i32>>,
    root_lock: HashMap<i32, (String, Option<String>)>,
}

#[derive(Clone)]
struct Row<'a> {
    session: Option<&'a RawSession>,
    /// Wait details, possibly taken from a waiting parallel worker of this leader.
    wait: Option<&'a RawSession>,
}

pub(crate) fn build_trees(
    sessions: &[RawSession],
    held: &[RawHeld],
    waited: &[RawWaitedRel],
) -> Vec<LockNode> {
    let leader: HashMap<i32, i32> = sessions
        .iter()
        .filter_map(|s| match s.leader_pid {
            Some(l) if l != s.pid => Some((s.pid, l)),
            _ => None,
        })
        .collect();
    let canon = |pid: i32| leader.get(&pid).copied().unwrap_or(pid);

    let mut rows: BTreeMap<i32, Row<'_>> = BTreeMap::new();
    let mut blocked_by: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
    for s in sessions {
        let c = canon(s.pid);
        let row = rows.entry(c).or_insert(Row {
            session: None,
            wait: None,
        });
        if s.pid == c {
            row.session = Some(s);
        }
        if !s.blocked_by.is_empty() {
            // The leader's own wait wins over a worker's.
            if row.wait.is_none() || s.pid == c {
                row.wait = Some(s);
            }
            let set = blocked_by.entry(c).or_default();
            set.extend(s.blocked_by.iter().map(|b| canon(*b)).filter(|b| *b != c));
        }
    }
    blocked_by.retain(|_, set| !set.is_empty());

    // Every blocker is a node, even one the sample has no row for (a prepared transaction
    // shows as pid 0).
    let blockers: BTreeSet<i32> = blocked_by.values().flatten().copied().collect();
    for b in &blockers {
        rows.entry(*b).or_insert(Row {
            session: None,
            wait: None,
        });
    }

    // Transitive "waits for" closure, to keep only the nearest blockers.
    let ancestors = |start: i32| -> BTreeSet<i32> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<i32> = blocked_by
            .get(&start)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        while let Some(p) = stack.pop() {
            if seen.insert(p)
                && let Some(next) = blocked_by.get(&p)
            {
                stack.extend(next.iter().copied());
            }
        }
        seen
    };
    let anc: BTreeMap<i32, BTreeSet<i32>> =
        rows.keys().map(|pid| (*pid, ancestors(*pid))).collect();
    let empty = BTreeSet::new();
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for (x, parents) in &blocked_by {
        for p in parents {
            let behind_other = parents.iter().any(|q| {
                q != p
                    && anc.get(q).unwrap_or(&empty).contains(p)
                    && !anc.get(p).unwrap_or(&empty).contains(q)
            });
            if !behind_other {
                children.entry(*p).or_default().push(*x);
            }
        }
    }

    // What a root holds on the relations its waiters wait for.
    let waited_oids: HashMap<i32, i64> = waited
        .iter()
        .filter_map(|w| Some((canon(w.pid), w.relation_oid?)))
        .collect();
    let mut root_lock: HashMap<i32, (String, Option<String>)> = HashMap::new();
    for (p, kids) in &children {
        let oids: BTreeSet<i64> = kids
            .iter()
            .filter_map(|k| waited_oids.get(k).copied())
            .collect();
        let best = held
            .iter()
            .filter(|h| canon(h.pid) == *p && h.relation_oid.is_some_and(|o| oids.contains(&o)))
            .max_by_key(|h| mode_rank(&h.mode));
        if let Some(h) = best {
            root_lock.insert(*p, (h.mode.clone(), h.relation.clone()));
        }
    }

    let graph = Graph {
        rows,
        blocked_by,
        children,
        root_lock,
    };
    let roots: Vec<i32> = blockers
        .iter()
        .copied()
        .filter(|b| !graph.blocked_by.contains_key(b))
        .collect();

    let mut trees = Vec::new();
    let mut placed = BTreeSet::new();
    for r in &roots {
        let mut path = BTreeSet::new();
        trees.push(graph.node(*r, &mut path, &mut placed, false));
    }
    // Cycles: waiters reached from no root.
    loop {
        let next = graph
            .blocked_by
            .keys()
            .copied()
            .find(|pid| !placed.contains(pid));
        let Some(pid) = next else { break };
        let mut path = BTreeSet::new();
        trees.push(graph.node(pid, &mut path, &mut placed, true));
    }
    trees.sort_by(|a, b| {
        b.longest_wait_ms()
            .cmp(&a.longest_wait_ms())
            .then(a.pid.cmp(&b.pid))
    });
    trees
}

impl Graph<'_> {
    fn node(
        &self,
        pid: i32,
        path: &mut BTreeSet<i32>,
        placed: &mut BTreeSet<i32>,
        in_cycle: bool,
    ) -> LockNode {
        path.insert(pid);
        placed.insert(pid);
        let row = self.rows.get(&pid).cloned().unwrap_or(Row {
            session: None,
            wait: None,
        });
        let s = row.session.or(row.wait);
        let mut node = LockNode {
            pid,
            user: s.and_then(|s| s.user.clone()),
            application: s.and_then(|s| s.application.clone()),
            database: s.and_then(|s| s.database.clone()),
            state: s
                .and_then(|s| s.state.clone())
                .or_else(|| (pid == 0).then(|| "prepared transaction".to_string())),
            wait_event: s.and_then(wait_event),
            mode: None,
            lock_type: None,
            relation: None,
            waiting_ms: None,
            xact_ms: s.and_then(|s| ms(s.xact_ms)),
            query: s.and_then(|s| excerpt(s.query.as_deref())),
            blocked_by: self
                .blocked_by
                .get(&pid)
                .map(|b| b.iter().copied().collect())
                .unwrap_or_default(),
            in_cycle,
            children: Vec::new(),
        };
        if let Some(w) = row.wait {
            node.mode = w.mode.clone();
            node.lock_type = w.lock_type.clone();
            node.relation = w.relation.clone();
            node.waiting_ms = ms(w.waiting_ms).or(Some(0));
            if node.wait_event.is_none() {
                node.wait_event = wait_event(w);
            }
        } else if let Some((mode, relation)) = self.root_lock.get(&pid) {
            node.mode = Some(mode.clone());
            node.lock_type = Some("relation".into());
            node.relation = relation.clone();
        }
        let mut kids: Vec<i32> = self.children.get(&pid).cloned().unwrap_or_default();
        kids.sort_unstable();
        kids.dedup();
        for k in kids {
            if path.contains(&k) {
                continue;
            }
            node.children.push(self.node(k, path, placed, false));
        }
        node.children
            .sort_by(|a, b| b.waiting_ms.cmp(&a.waiting_ms).then(a.pid.cmp(&b.pid)));
        path.remove(&pid);
        node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pid: i32, blocked_by: &[i32], waiting_ms: Option<i64>) -> RawSession {
        RawSession {
            pid,
            leader_pid: None,
            user: Some("u".into()),
            application: None,
            database: None,
            client_addr: None,
            state: Some("active".into()),
            wait_event_type: None,
            wait_event: None,
            backend_type: Some("client backend".into()),
            query_ms: None,
            xact_ms: None,
            state_ms: None,
            query: Some(format!("q{pid}")),
            blocked_by: blocked_by.to_vec(),
            lock_type: waiting_ms.map(|_| "relation".into()),
            mode: waiting_ms.map(|_| "AccessExclusiveLock".into()),
            relation: waiting_ms.map(|_| "t".into()),
            waiting_ms,
        }
    }

    #[test]
    fn queue_is_a_chain_not_a_fan() {
        // A holds; B waits on A; C waits on A and (soft) on B.
        let rows = [
            s(1, &[], None),
            s(2, &[1], Some(50)),
            s(3, &[1, 2], Some(10)),
        ];
        let t = build_trees(&rows, &[], &[]);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].pid, 1);
        assert_eq!(t[0].children.len(), 1);
        assert_eq!(t[0].children[0].pid, 2);
        assert_eq!(t[0].children[0].children[0].pid, 3);
        assert_eq!(t[0].longest_wait_ms(), 50);
    }

    #[test]
    fn independent_blockers_each_show_the_waiter() {
        let rows = [s(1, &[], None), s(2, &[], None), s(3, &[1, 2], Some(5))];
        let t = build_trees(&rows, &[], &[]);
        assert_eq!(t.len(), 2);
        assert!(
            t.iter()
                .all(|r| r.children.len() == 1 && r.children[0].pid == 3)
        );
    }

    #[test]
    fn cycles_terminate_and_are_marked() {
        let rows = [s(1, &[2], Some(5)), s(2, &[1], Some(7))];
        let t = build_trees(&rows, &[], &[]);
        assert_eq!(t.len(), 1);
        assert!(t[0].in_cycle);
        let pids = t[0].pids();
        assert_eq!(pids.len(), 2);
    }

    #[test]
    fn parallel_workers_fold_into_their_leader() {
        let mut worker = s(11, &[1], Some(30));
        worker.leader_pid = Some(10);
        let mut leader = s(10, &[], None);
        leader.leader_pid = Some(10);
        let rows = [s(1, &[], None), leader, worker];
        let t = build_trees(&rows, &[], &[]);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].children[0].pid, 10);
        assert_eq!(t[0].children[0].waiting_ms, Some(30));
    }

    #[test]
    fn root_reports_the_mode_it_holds_on_the_waited_relation() {
        let rows = [s(1, &[], None), s(2, &[1], Some(5))];
        let held = [
            RawHeld {
                pid: 1,
                mode: "AccessShareLock".into(),
                relation: Some("t".into()),
                relation_oid: Some(42),
            },
            RawHeld {
                pid: 1,
                mode: "RowExclusiveLock".into(),
                relation: Some("t".into()),
                relation_oid: Some(42),
            },
        ];
        let waited = [RawWaitedRel {
            pid: 2,
            relation_oid: Some(42),
        }];
        let t = build_trees(&rows, &held, &waited);
        assert_eq!(t[0].mode.as_deref(), Some("RowExclusiveLock"));
        assert_eq!(t[0].relation.as_deref(), Some("t"));
        assert_eq!(t[0].waiting_ms, None);
    }
}
