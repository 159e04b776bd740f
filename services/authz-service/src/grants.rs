//! The store of facts decisions read: every grant row, indexed in memory
//! the way decisions look, and [`Grants::facts`], which picks what one
//! batch of checks needs. No I/O: [`crate::policy`] loads it from the
//! database; [`crate::rules`] decides on the facts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use secrets_common::Principal;

use crate::{
    Error, Result,
    rules::{Check, Facts, Permission, Placement, ResourceType, Role, Target},
};

/// Nesting deeper than this is not followed (cycles are refused when they
/// would form, so this only bounds a pathological hierarchy).
const MAX_GROUP_DEPTH: u32 = 32;

/// Every row that bears on a decision, indexed the way decisions look.
#[derive(Default)]
pub struct Grants {
    pub version: i64,
    pub admins: BTreeSet<Principal>,
    /// Member (`user:x`, `group:y`) → the groups it is directly in.
    pub parents: HashMap<String, Vec<String>>,
    /// Domain → (subject, role).
    pub roles: HashMap<String, Vec<(Principal, Role)>>,
    /// Domain → (subject, permission).
    pub permissions: HashMap<String, Vec<(Principal, Permission)>>,
    /// Bundle → owner.
    pub bundles: HashMap<String, Principal>,
    /// Bundle → (subject, permission).
    pub bundle_grants: HashMap<String, Vec<(Principal, Permission)>>,
    /// Resource id → (type, placement).
    pub resources: HashMap<String, Vec<(ResourceType, Placement)>>,
    /// Domain → (stored subject, what is wrong) for rows that do not parse:
    /// a decision that needs one is an error, the others are unaffected.
    pub broken: HashMap<String, Vec<(String, String)>>,
}

impl Grants {
    /// The facts `checks` need about `subjects`, as [`rules::decide`] reads them.
    pub fn facts(
        &self,
        bootstrap_admins: &BTreeSet<Principal>,
        subjects: &BTreeSet<Principal>,
        checks: &[Check],
    ) -> Result<Facts> {
        let mut facts = Facts { admins: bootstrap_admins.clone(), ..Facts::default() };
        facts.admins.extend(subjects.iter().filter(|s| self.admins.contains(*s)).cloned());
        // Groups of each subject: a walk up nested groups, the shortest path
        // winning when a group is reached twice; token groups count at the
        // first level.
        for subject in subjects {
            let root = subject.to_string();
            let mut paths: BTreeMap<String, String> = BTreeMap::new();
            let mut frontier: Vec<(String, String)> = self
                .parents
                .get(&root)
                .into_iter()
                .flatten()
                .map(|g| (g.clone(), format!("{root} ∈ group:{g}")))
                .collect();
            for c in checks.iter().filter(|c| &c.subject == subject) {
                frontier.extend(c.token_groups.iter().map(|g| (g.clone(), format!("{root} ∈ group:{g} (token)"))));
            }
            for _ in 0..MAX_GROUP_DEPTH {
                let mut next = Vec::new();
                for (group, path) in frontier {
                    if paths.get(&group).is_some_and(|p| p.len() <= path.len()) {
                        continue;
                    }
                    for parent in self.parents.get(&format!("group:{group}")).into_iter().flatten() {
                        next.push((parent.clone(), format!("{path} ∈ group:{parent}")));
                    }
                    paths.insert(group, path);
                }
                if next.is_empty() {
                    break;
                }
                frontier = next;
            }
            if !paths.is_empty() {
                facts.memberships.insert(subject.clone(), paths);
            }
        }
        let mut holders: BTreeSet<Principal> = subjects.clone();
        holders.extend(facts.memberships.values().flat_map(|m| m.keys()).map(Principal::group));
        let mut bundles: BTreeSet<&str> = BTreeSet::new();
        for c in checks {
            match &c.target {
                Target::Domain(d) => {
                    if let Some((_, why)) = self
                        .broken
                        .get(d)
                        .into_iter()
                        .flatten()
                        .find(|(who, _)| holders.iter().any(|h| h.to_string() == *who))
                    {
                        return Err(Error::Internal(why.clone()));
                    }
                    for (who, role) in self.roles.get(d).into_iter().flatten().filter(|(w, _)| holders.contains(w)) {
                        facts.roles.insert((d.clone(), who.clone()), *role);
                    }
                    for (who, p) in self.permissions.get(d).into_iter().flatten().filter(|(w, _)| holders.contains(w)) {
                        facts.grants.insert((d.clone(), who.clone(), *p));
                    }
                }
                Target::Bundle(b) => {
                    bundles.insert(b);
                }
                Target::Resource(_, id) => {
                    for (kind, placement) in self.resources.get(id).into_iter().flatten() {
                        facts.resources.insert((*kind, id.clone()), placement.clone());
                        bundles.insert(&placement.bundle);
                        // Owners of the resource's domain see and change it.
                        let d = &placement.domain;
                        for (who, role) in self.roles.get(d).into_iter().flatten().filter(|(w, _)| holders.contains(w))
                        {
                            facts.roles.insert((d.clone(), who.clone()), *role);
                        }
                    }
                }
                Target::Platform => {}
            }
        }
        for b in bundles {
            if let Some(owner) = self.bundles.get(b) {
                facts.bundles.insert(b.to_string(), owner.clone());
            }
            for (who, p) in self.bundle_grants.get(b).into_iter().flatten().filter(|(w, _)| holders.contains(w)) {
                facts.bundle_grants.insert((b.to_string(), who.clone(), *p));
            }
        }
        Ok(facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{self, Decision};

    fn p(text: &str) -> Principal {
        match text.strip_prefix("group:") {
            Some(g) => Principal::group(g),
            None => text.parse().unwrap(),
        }
    }

    fn check(subject: &str, permission: Permission, target: Target, token_groups: &[&str]) -> Check {
        Check {
            subject: p(subject),
            permission,
            target,
            token_groups: token_groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// Facts for one check, then the decision the rules make on them.
    fn decide(grants: &Grants, admins: &[&str], c: &Check) -> Result<Decision> {
        let admins = admins.iter().map(|a| p(a)).collect();
        let facts = grants.facts(&admins, &BTreeSet::from([c.subject.clone()]), std::slice::from_ref(c))?;
        Ok(rules::decide(&facts, c))
    }

    fn nested() -> Grants {
        let mut g = Grants::default();
        // alice ∈ data-eng ∈ eng ∈ all; alice ∈ all directly too.
        g.parents.insert("user:alice".into(), vec!["data-eng".into(), "all".into()]);
        g.parents.insert("group:data-eng".into(), vec!["eng".into()]);
        g.parents.insert("group:eng".into(), vec!["all".into()]);
        // A permission counts for members of the domain.
        g.roles.insert("sales".into(), vec![(p("group:all"), Role::Member)]);
        g.roles.insert("hr".into(), vec![(p("group:eng"), Role::Member)]);
        g.permissions.insert("sales".into(), vec![(p("group:all"), Permission::UseSecrets)]);
        g.permissions.insert("hr".into(), vec![(p("group:eng"), Permission::ListSecrets)]);
        g
    }

    #[test]
    fn nested_groups_count_and_the_reason_gives_the_shortest_path() {
        let g = nested();
        let d =
            decide(&g, &[], &check("user:alice", Permission::UseSecrets, Target::Domain("sales".into()), &[])).unwrap();
        assert!(d.allowed, "{}", d.reason);
        assert!(d.reason.contains("user:alice ∈ group:all"), "{}", d.reason);
        assert!(!d.reason.contains("data-eng"), "the direct membership is the shorter path: {}", d.reason);

        let d =
            decide(&g, &[], &check("user:alice", Permission::ListSecrets, Target::Domain("hr".into()), &[])).unwrap();
        assert!(d.allowed && d.reason.contains("user:alice ∈ group:data-eng ∈ group:eng"), "{}", d.reason);

        let d =
            decide(&g, &[], &check("user:bob", Permission::UseSecrets, Target::Domain("sales".into()), &[])).unwrap();
        assert!(!d.allowed, "{}", d.reason);
    }

    #[test]
    fn token_groups_count_at_the_first_level_and_climb_recorded_nesting() {
        let g = nested();
        let c = check("user:carol", Permission::ListSecrets, Target::Domain("hr".into()), &["data-eng"]);
        let d = decide(&g, &[], &c).unwrap();
        assert!(d.allowed, "{}", d.reason);
        assert!(d.reason.contains("group:data-eng (token)"), "{}", d.reason);
    }

    #[test]
    fn a_row_that_does_not_parse_fails_only_the_decisions_that_need_it() {
        let mut g = nested();
        g.broken.insert("sales".into(), vec![("user:alice".into(), "a stored domain role is \"boss\"".into())]);
        let sales = check("user:alice", Permission::UseSecrets, Target::Domain("sales".into()), &[]);
        match decide(&g, &[], &sales) {
            Err(Error::Internal(m)) => assert!(m.contains("boss"), "{m}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        let hr = check("user:alice", Permission::ListSecrets, Target::Domain("hr".into()), &[]);
        assert!(decide(&g, &[], &hr).unwrap().allowed);
        let bob = check("user:bob", Permission::UseSecrets, Target::Domain("sales".into()), &[]);
        assert!(!decide(&g, &[], &bob).unwrap().allowed, "another subject is decided, not failed");
    }

    #[test]
    fn a_resource_brings_its_bundles_grants_and_its_domains_owners() {
        let mut g = Grants::default();
        let id = "0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b";
        g.resources.insert(
            id.into(),
            vec![(ResourceType::VaultConfig, Placement { bundle: "lake".into(), domain: "sales".into() })],
        );
        g.bundles.insert("lake".into(), p("user:owner"));
        g.bundle_grants.insert("lake".into(), vec![(p("user:spark"), Permission::Use)]);
        g.roles.insert("sales".into(), vec![(p("user:dana"), Role::Owner)]);
        let on =
            |who: &str, permission| check(who, permission, Target::Resource(ResourceType::VaultConfig, id.into()), &[]);

        assert!(decide(&g, &[], &on("user:spark", Permission::Use)).unwrap().allowed);
        assert!(decide(&g, &[], &on("user:dana", Permission::Update)).unwrap().allowed, "domain owners update");
        assert!(!decide(&g, &[], &on("user:dana", Permission::Use)).unwrap().allowed, "USE comes from the bundle only");
        assert!(!decide(&g, &[], &on("user:eve", Permission::View)).unwrap().allowed);
        assert!(decide(&g, &["user:root"], &on("user:root", Permission::Use)).unwrap().allowed, "admins may");

        let elsewhere = check(
            "user:spark",
            Permission::Use,
            Target::Resource(ResourceType::VaultConfig, "11111111-2222-3333-4444-555555555555".into()),
            &[],
        );
        let d = decide(&g, &[], &elsewhere).unwrap();
        assert!(!d.allowed && d.reason.contains("in no resource bundle"), "{}", d.reason);
    }
}
