//! The rules of the authz service, without I/O: platform admins may do
//! everything, domain owners everything in their domain, members what their
//! permissions say. Deny by default. [`crate::policy`] loads the [`Facts`]
//! a batch of checks needs in one query and asks [`decide`].

use std::collections::{BTreeMap, BTreeSet};

use secrets_common::Principal;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    ListSecrets,
    ManageSecrets,
    UseSecrets,
    ManageDomainAccess,
    PlatformAdmin,
}

impl Permission {
    pub fn name(self) -> &'static str {
        match self {
            Self::ListSecrets => "LIST_SECRETS",
            Self::ManageSecrets => "MANAGE_SECRETS",
            Self::UseSecrets => "USE_SECRETS",
            Self::ManageDomainAccess => "MANAGE_DOMAIN_ACCESS",
            Self::PlatformAdmin => "PLATFORM_ADMIN",
        }
    }

    /// The permissions a member can be granted; the rest come from roles.
    pub fn is_grantable(self) -> bool {
        matches!(self, Self::ListSecrets | Self::ManageSecrets)
    }

    /// A grantable permission by its stored name.
    pub fn from_grant_name(name: &str) -> Option<Self> {
        [Self::ListSecrets, Self::ManageSecrets].into_iter().find(|p| p.name() == name)
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

/// One question: may `subject` do `permission` (in `domain`)?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub subject: Principal,
    pub permission: Permission,
    pub domain: Option<String>,
}

/// What the database says about the subjects and domains of a batch.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub admins: BTreeSet<Principal>,
    pub roles: BTreeMap<(String, Principal), Role>,
    pub grants: BTreeSet<(String, Principal, Permission)>,
}

impl Facts {
    pub fn is_admin(&self, subject: &Principal) -> bool {
        self.admins.contains(subject)
    }
}

/// The answer to one check, with the reason a person can act on.
pub fn decide(facts: &Facts, check: &Check) -> Decision {
    let Check { subject, permission, domain } = check;
    let permission = *permission;
    if facts.is_admin(subject) {
        return Decision::allow(format!("{subject} is a platform admin"));
    }
    let Some(domain) = domain else {
        return Decision::deny(format!("{} needs a platform admin and {subject} is not one", permission.name()));
    };
    if permission == Permission::PlatformAdmin {
        return Decision::deny(format!("{subject} is not a platform admin"));
    }
    let Some(role) = facts.roles.get(&(domain.clone(), subject.clone())) else {
        return Decision::deny(format!("{subject} is not a member of domain {domain:?}"));
    };
    match (role, permission) {
        (Role::Owner, _) => Decision::allow(format!("{subject} owns domain {domain:?}")),
        (Role::Member, Permission::UseSecrets) => {
            Decision::allow(format!("{subject} is a member of domain {domain:?}"))
        }
        (Role::Member, p) if facts.grants.contains(&(domain.clone(), subject.clone(), p)) => {
            Decision::allow(format!("{subject} holds {} in domain {domain:?}", p.name()))
        }
        (Role::Member, Permission::ManageDomainAccess) => {
            Decision::deny(format!("{subject} is a member, not an owner, of domain {domain:?}"))
        }
        (Role::Member, p) => Decision::deny(format!("{subject} does not hold {} in domain {domain:?}", p.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(subject: &str, permission: Permission, domain: Option<&str>) -> Check {
        Check { subject: Principal::user(subject), permission, domain: domain.map(str::to_string) }
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

    #[test]
    fn stored_roles_other_than_owner_and_member_are_not_understood() {
        assert_eq!(Role::parse("owner"), Some(Role::Owner));
        assert_eq!(Role::parse("member"), Some(Role::Member));
        assert_eq!(Role::parse("Owner"), None);
        assert_eq!(Role::parse("admin"), None);
    }
}
