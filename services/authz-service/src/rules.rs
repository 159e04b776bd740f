//! The rules of the authz service, without I/O. Deny by default:
//!
//! - platform admins may do everything;
//! - in a domain, owners may do everything and members what their
//!   permissions say;
//! - on a resource bundle (and the resources it holds), owners hold VIEW,
//!   UPDATE, USE and MANAGE_BUNDLE, and grants give VIEW, UPDATE or USE;
//! - a subject holds what every group it belongs to holds, directly or
//!   through nested groups, and reasons name that path.
//!
//! [`crate::policy`] loads the [`Facts`] a batch of checks needs in one
//! query and asks [`decide`].

use std::collections::{BTreeMap, BTreeSet};

use secrets_common::Principal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    ListSecrets,
    ManageSecrets,
    UseSecrets,
    ManageDomainAccess,
    PlatformAdmin,
    View,
    Update,
    Use,
    ManageBundle,
}

impl Permission {
    pub fn name(self) -> &'static str {
        match self {
            Self::ListSecrets => "LIST_SECRETS",
            Self::ManageSecrets => "MANAGE_SECRETS",
            Self::UseSecrets => "USE_SECRETS",
            Self::ManageDomainAccess => "MANAGE_DOMAIN_ACCESS",
            Self::PlatformAdmin => "PLATFORM_ADMIN",
            Self::View => "VIEW",
            Self::Update => "UPDATE",
            Self::Use => "USE",
            Self::ManageBundle => "MANAGE_BUNDLE",
        }
    }

    /// The permissions a domain member can be granted; the rest come from roles.
    pub fn is_grantable(self) -> bool {
        matches!(self, Self::ListSecrets | Self::ManageSecrets)
    }

    /// A grantable domain permission by its stored name.
    pub fn from_grant_name(name: &str) -> Option<Self> {
        [Self::ListSecrets, Self::ManageSecrets].into_iter().find(|p| p.name() == name)
    }

    /// The permissions a bundle grant can give.
    pub fn is_bundle_grantable(self) -> bool {
        matches!(self, Self::View | Self::Update | Self::Use)
    }

    /// A bundle permission by its stored name.
    pub fn from_bundle_grant_name(name: &str) -> Option<Self> {
        [Self::View, Self::Update, Self::Use].into_iter().find(|p| p.name() == name)
    }

    /// Asked about a bundle or a resource, not a domain.
    pub fn is_bundle_permission(self) -> bool {
        matches!(self, Self::View | Self::Update | Self::Use | Self::ManageBundle)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Owner,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Member => "member",
        }
    }

    /// A stored role; anything else is corrupt data, never "member".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Self::Owner),
            "member" => Some(Self::Member),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    VaultConfig,
}

impl ResourceType {
    pub fn name(self) -> &'static str {
        match self {
            Self::VaultConfig => "VAULT_CONFIG",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        (name == "VAULT_CONFIG").then_some(Self::VaultConfig)
    }

    fn describe(self) -> &'static str {
        match self {
            Self::VaultConfig => "Vault config",
        }
    }
}

/// What a check asks about, besides the permission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// PLATFORM_ADMIN.
    Platform,
    Domain(String),
    Bundle(String),
    Resource(ResourceType, String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

impl Decision {
    fn allow(reason: impl Into<String>) -> Self {
        Self { allowed: true, reason: reason.into() }
    }

    fn deny(reason: impl Into<String>) -> Self {
        Self { allowed: false, reason: reason.into() }
    }
}

/// One question: may `subject` do `permission` on `target`?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub subject: Principal,
    pub permission: Permission,
    pub target: Target,
    /// Groups the subject's identity provider says it belongs to.
    pub token_groups: Vec<String>,
}

/// Where a resource lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub bundle: String,
    pub domain: String,
}

/// What the database says about the subjects, domains, bundles and
/// resources of a batch.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub admins: BTreeSet<Principal>,
    /// Per acting subject: each group it belongs to, with the path that
    /// makes it a member (`user:alice ∈ group:data-eng ∈ group:eng`).
    pub memberships: BTreeMap<Principal, BTreeMap<String, String>>,
    /// Domain roles of subjects and groups.
    pub roles: BTreeMap<(String, Principal), Role>,
    /// Domain permissions of subjects and groups.
    pub grants: BTreeSet<(String, Principal, Permission)>,
    /// Bundle name → owner.
    pub bundles: BTreeMap<String, Principal>,
    /// (bundle, subject or group, VIEW/UPDATE/USE).
    pub bundle_grants: BTreeSet<(String, Principal, Permission)>,
    pub resources: BTreeMap<(ResourceType, String), Placement>,
}

impl Facts {
    pub fn is_admin(&self, subject: &Principal) -> bool {
        self.admins.contains(subject)
    }

    /// The subject itself and every group it belongs to, each with the path
    /// that says why.
    fn effective(&self, subject: &Principal) -> Vec<(Principal, String)> {
        let mut out = vec![(subject.clone(), subject.to_string())];
        if let Some(groups) = self.memberships.get(subject) {
            out.extend(groups.iter().map(|(g, path)| (Principal::group(g), path.clone())));
        }
        out
    }
}

/// `user:alice` or `user:alice ∈ group:eng` (the path), then `; group:eng`
/// when the holder is a group.
fn via(path: &str, holder: &Principal, subject: &Principal) -> String {
    if holder == subject { path.to_string() } else { format!("{path}; {holder}") }
}

/// The answer to one check, with the reason a person can act on.
pub fn decide(facts: &Facts, check: &Check) -> Decision {
    let subject = &check.subject;
    let permission = check.permission;
    if facts.is_admin(subject) {
        return Decision::allow(format!("{subject} is a platform admin"));
    }
    match &check.target {
        Target::Platform => {
            Decision::deny(format!("{} needs a platform admin and {subject} is not one", permission.name()))
        }
        Target::Domain(domain) => decide_domain(facts, subject, permission, domain),
        Target::Bundle(bundle) => decide_bundle(facts, subject, permission, bundle, None),
        Target::Resource(kind, id) => match facts.resources.get(&(*kind, id.clone())) {
            None => Decision::deny(format!("{} {id:?} is in no resource bundle", kind.describe())),
            Some(p) => decide_resource(facts, subject, permission, p, (*kind, id)),
        },
    }
}

/// A resource: what its bundle grants; besides, the owners of the
/// resource's domain VIEW and UPDATE it (USE still comes from the bundle
/// only), and UPDATE includes VIEW.
fn decide_resource(
    facts: &Facts,
    subject: &Principal,
    permission: Permission,
    placement: &Placement,
    resource: (ResourceType, &String),
) -> Decision {
    let by_bundle = decide_bundle(facts, subject, permission, &placement.bundle, Some(resource));
    if by_bundle.allowed || !matches!(permission, Permission::View | Permission::Update) {
        return by_bundle;
    }
    let domain = &placement.domain;
    let owner = facts
        .effective(subject)
        .into_iter()
        .find(|(holder, _)| facts.roles.get(&(domain.clone(), holder.clone())) == Some(&Role::Owner));
    if let Some((holder, path)) = owner {
        let (kind, id) = resource;
        return Decision::allow(format!(
            "{} owns domain {domain:?}, which {} {id:?} belongs to",
            via(&path, &holder, subject),
            kind.describe()
        ));
    }
    if permission == Permission::View {
        let update = decide_bundle(facts, subject, Permission::Update, &placement.bundle, Some(resource));
        if update.allowed {
            return Decision::allow(format!("{} (UPDATE includes VIEW)", update.reason));
        }
    }
    by_bundle
}

fn decide_domain(facts: &Facts, subject: &Principal, permission: Permission, domain: &str) -> Decision {
    if permission == Permission::PlatformAdmin {
        return Decision::deny(format!("{subject} is not a platform admin"));
    }
    let effective = facts.effective(subject);
    let role_of = |role: Role| {
        effective.iter().find(|(holder, _)| facts.roles.get(&(domain.to_string(), holder.clone())) == Some(&role))
    };
    if let Some((holder, path)) = role_of(Role::Owner) {
        return Decision::allow(format!("{} owns domain {domain:?}", via(path, holder, subject)));
    }
    let Some((member, member_path)) = role_of(Role::Member) else {
        return Decision::deny(format!("{subject} is not a member of domain {domain:?}, directly or through a group"));
    };
    match permission {
        Permission::UseSecrets => {
            Decision::allow(format!("{} is a member of domain {domain:?}", via(member_path, member, subject)))
        }
        Permission::ManageDomainAccess => {
            Decision::deny(format!("{subject} is a member, not an owner, of domain {domain:?}"))
        }
        p => {
            let holder = effective.iter().find(|(h, _)| facts.grants.contains(&(domain.to_string(), h.clone(), p)));
            match holder {
                Some((h, path)) => {
                    Decision::allow(format!("{} holds {} in domain {domain:?}", via(path, h, subject), p.name()))
                }
                None => Decision::deny(format!("{subject} does not hold {} in domain {domain:?}", p.name())),
            }
        }
    }
}

fn decide_bundle(
    facts: &Facts,
    subject: &Principal,
    permission: Permission,
    bundle: &str,
    resource: Option<(ResourceType, &String)>,
) -> Decision {
    let on = match resource {
        Some((kind, id)) => format!("{} {id:?} (bundle {bundle})", kind.describe()),
        None => format!("bundle {bundle}"),
    };
    if !permission.is_bundle_permission() {
        return Decision::deny(format!("{} is not a permission on {on}", permission.name()));
    }
    let Some(owner) = facts.bundles.get(bundle) else {
        return Decision::deny(format!("bundle {bundle} does not exist"));
    };
    let effective = facts.effective(subject);
    if let Some((holder, path)) = effective.iter().find(|(h, _)| h == owner) {
        return Decision::allow(format!("{} owns bundle {bundle}", via(path, holder, subject)));
    }
    if permission == Permission::ManageBundle {
        return Decision::deny(format!("only the owner of bundle {bundle} ({owner}) and platform admins manage it"));
    }
    let holder =
        effective.iter().find(|(h, _)| facts.bundle_grants.contains(&(bundle.to_string(), h.clone(), permission)));
    match holder {
        Some((h, path)) => {
            Decision::allow(format!("{} holds {} on bundle {bundle}", via(path, h, subject), permission.name()))
        }
        None => {
            Decision::deny(format!("{subject} holds no {} on {on}, directly or through a group", permission.name()))
        }
    }
}

/// The cycle that adding `member` to `group` would close, as a path
/// (`group:a ∈ group:b ∈ group:a`), given every group-in-group edge
/// (member group → groups it is in).
pub fn cycle(edges: &BTreeMap<String, BTreeSet<String>>, group: &str, member: &str) -> Option<String> {
    // Adding member ∈ group closes a cycle when group is already (nested)
    // inside member: search upwards from group for member.
    if group == member {
        return Some(format!("group:{member} ∈ group:{group}"));
    }
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([group]);
    let mut seen = BTreeSet::from([group]);
    while let Some(g) = queue.pop_front() {
        for up in edges.get(g).into_iter().flatten() {
            if !seen.insert(up.as_str()) {
                continue;
            }
            parent.insert(up.as_str(), g);
            if up == member {
                // member ∈ group ∈ ... ∈ member
                let mut chain = vec![member];
                let mut at = member;
                while let Some(p) = parent.get(at) {
                    chain.push(p);
                    at = p;
                }
                chain.reverse();
                let mut path = format!("group:{member}");
                for g in chain {
                    path.push_str(&format!(" ∈ group:{g}"));
                }
                return Some(path);
            }
            queue.push_back(up.as_str());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(subject: &str, permission: Permission, domain: Option<&str>) -> Check {
        Check {
            subject: Principal::user(subject),
            permission,
            target: domain.map_or(Target::Platform, |d| Target::Domain(d.into())),
            token_groups: Vec::new(),
        }
    }

    fn facts() -> Facts {
        let mut f = Facts::default();
        f.admins.insert(Principal::user("root"));
        f.roles.insert(("fin".into(), Principal::user("olivia")), Role::Owner);
        f.roles.insert(("fin".into(), Principal::user("lisa")), Role::Member);
        f.roles.insert(("fin".into(), Principal::user("nina")), Role::Member);
        f.grants.insert(("fin".into(), Principal::user("lisa"), Permission::ListSecrets));
        f
    }

    #[test]
    fn each_role_gets_exactly_what_it_holds() {
        use Permission::*;
        let f = facts();
        let cases = [
            ("root", PlatformAdmin, None, true, "is a platform admin"),
            ("root", ManageSecrets, Some("any"), true, "is a platform admin"),
            ("olivia", ManageDomainAccess, Some("fin"), true, "owns domain"),
            ("olivia", PlatformAdmin, None, false, "needs a platform admin"),
            ("lisa", ListSecrets, Some("fin"), true, "holds LIST_SECRETS"),
            ("lisa", ManageSecrets, Some("fin"), false, "does not hold MANAGE_SECRETS"),
            ("nina", UseSecrets, Some("fin"), true, "is a member"),
            ("nina", ManageDomainAccess, Some("fin"), false, "not an owner"),
            ("eve", UseSecrets, Some("fin"), false, "is not a member"),
            ("lisa", ListSecrets, Some("other"), false, "is not a member of domain \"other\""),
        ];
        for (who, p, d, allowed, reason) in cases {
            let got = decide(&f, &check(who, p, d));
            assert_eq!(got.allowed, allowed, "{who} {p:?} {d:?}: {}", got.reason);
            assert!(got.reason.contains(reason), "{who} {p:?}: {}", got.reason);
        }
    }

    fn bundle_facts() -> Facts {
        let mut f = Facts::default();
        f.bundles.insert("finance-vault".into(), Principal::group("vault-admins"));
        f.bundle_grants.insert(("finance-vault".into(), Principal::group("eng"), Permission::Use));
        f.bundle_grants.insert(("finance-vault".into(), Principal::user("vic"), Permission::View));
        f.resources.insert(
            (ResourceType::VaultConfig, "cfg-1".into()),
            Placement { bundle: "finance-vault".into(), domain: "fin".into() },
        );
        f.memberships.insert(
            Principal::user("alice"),
            BTreeMap::from([
                ("data-eng".to_string(), "user:alice ∈ group:data-eng".to_string()),
                ("eng".to_string(), "user:alice ∈ group:data-eng ∈ group:eng".to_string()),
            ]),
        );
        f.memberships.insert(
            Principal::user("olga"),
            BTreeMap::from([("vault-admins".to_string(), "user:olga ∈ group:vault-admins".to_string())]),
        );
        f
    }

    fn on_config(subject: &str, permission: Permission) -> Decision {
        let c = Check {
            subject: Principal::user(subject),
            permission,
            target: Target::Resource(ResourceType::VaultConfig, "cfg-1".into()),
            token_groups: Vec::new(),
        };
        decide(&bundle_facts(), &c)
    }

    #[test]
    fn bundle_permissions_come_from_owners_grants_and_nested_groups_and_say_the_path() {
        let d = on_config("alice", Permission::Use);
        assert!(d.allowed, "{}", d.reason);
        assert_eq!(d.reason, "user:alice ∈ group:data-eng ∈ group:eng; group:eng holds USE on bundle finance-vault");
        let d = on_config("alice", Permission::Update);
        assert!(!d.allowed);
        assert!(d.reason.contains("holds no UPDATE on Vault config \"cfg-1\" (bundle finance-vault)"), "{}", d.reason);
        let d = on_config("vic", Permission::View);
        assert_eq!((d.allowed, d.reason.as_str()), (true, "user:vic holds VIEW on bundle finance-vault"));
        assert!(!on_config("vic", Permission::Use).allowed);
        for p in [Permission::View, Permission::Update, Permission::Use, Permission::ManageBundle] {
            let d = on_config("olga", p);
            assert!(d.allowed, "owners hold {p:?}: {}", d.reason);
            assert!(d.reason.contains("group:vault-admins owns bundle finance-vault"), "{}", d.reason);
        }
        assert!(!on_config("alice", Permission::ManageBundle).allowed);
        let unknown = Check {
            subject: Principal::user("olga"),
            permission: Permission::Use,
            target: Target::Resource(ResourceType::VaultConfig, "nope".into()),
            token_groups: Vec::new(),
        };
        assert!(decide(&bundle_facts(), &unknown).reason.contains("in no resource bundle"));
    }

    #[test]
    fn a_membership_that_would_close_a_cycle_is_named() {
        // a ∈ b, b ∈ c: adding c ∈ a closes c ∈ a ∈ b ∈ c.
        let edges = BTreeMap::from([
            ("a".to_string(), BTreeSet::from(["b".to_string()])),
            ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ]);
        assert_eq!(cycle(&edges, "a", "c").as_deref(), Some("group:c ∈ group:a ∈ group:b ∈ group:c"));
        assert_eq!(cycle(&edges, "a", "a").as_deref(), Some("group:a ∈ group:a"));
        assert_eq!(cycle(&edges, "c", "a"), None, "a ∈ c is fine: c holds nothing of a");
        assert_eq!(cycle(&edges, "x", "y"), None);
    }

    #[test]
    fn stored_roles_other_than_owner_and_member_are_not_understood() {
        assert_eq!(Role::parse("owner"), Some(Role::Owner));
        assert_eq!(Role::parse("member"), Some(Role::Member));
        assert_eq!(Role::parse("Owner"), None);
        assert_eq!(Role::parse("admin"), None);
    }
}
