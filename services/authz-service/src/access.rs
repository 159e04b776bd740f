//! Who may do what in the authz service's own API: managing a domain's
//! access needs MANAGE_DOMAIN_ACCESS there, groups and admins need a
//! platform admin, a bundle its owner; and who may ask which checks
//! ([`may_ask`], a rule without I/O). The gRPC adapter asks these before
//! every change it makes through [`Policy`].

use secrets_common::{Principal, auth::Acting};

use crate::{
    Error, Result,
    policy::{Check, Decision, Permission, Policy, Target},
};

#[derive(Clone)]
pub struct Access {
    policy: Policy,
}

/// The names of `caller`'s token groups, as checks carry them.
pub fn token_groups(caller: &Acting) -> Vec<String> {
    caller.groups.iter().map(|g| g.name.clone()).collect()
}

/// Whether `caller` may ask `checks`: a forwarded call (one that names a
/// principal) asks about its own principal only, and carries no token
/// groups, unless that principal is a platform admin. Token groups come from
/// a verified token, which only the services see: a person asking through
/// the gateway cannot claim groups. A call with no principal is a service's.
pub fn may_ask(caller: Option<&Principal>, caller_is_admin: bool, checks: &[Check]) -> Result<()> {
    let Some(caller) = caller else { return Ok(()) };
    if caller_is_admin {
        return Ok(());
    }
    if checks.iter().any(|c| &c.subject != caller) {
        return Err(Error::PermissionDenied(format!(
            "{caller} may check its own permissions only; platform admins may check anyone's"
        )));
    }
    if checks.iter().any(|c| !c.token_groups.is_empty()) {
        return Err(Error::PermissionDenied(format!(
            "{caller} may not set groups: they come from a verified identity token, not from the caller"
        )));
    }
    Ok(())
}

impl Access {
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// Ok when `caller` may do `permission` on `target`; otherwise
    /// PERMISSION_DENIED saying what `action` needed and why.
    pub async fn require(&self, caller: &Acting, permission: Permission, target: Target, action: &str) -> Result<()> {
        let d = self.policy.check_with_groups(caller, token_groups(caller), permission, target).await?;
        if d.allowed {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!("{caller} may not {action}: {}", d.reason)))
        }
    }

    /// Management calls need the caller to own the domain or be an admin.
    pub async fn require_domain_access(&self, caller: &Acting, domain: &str) -> Result<()> {
        self.require(
            caller,
            Permission::ManageDomainAccess,
            Target::Domain(domain.to_string()),
            &format!("manage access to domain {domain:?}"),
        )
        .await
    }

    pub async fn require_admin(&self, caller: &Acting, action: &str) -> Result<()> {
        self.require(caller, Permission::PlatformAdmin, Target::Platform, action).await
    }

    /// Answers parsed checks from the grants in memory (one read of the
    /// change counter), once [`may_ask`] allows the caller to ask them.
    pub async fn answer(&self, caller: Option<&Principal>, checks: &[Check]) -> Result<Vec<Decision>> {
        let (caller_is_admin, decisions) = self.policy.check_batch(caller, checks).await?;
        may_ask(caller, caller_is_admin, checks)?;
        Ok(decisions)
    }

    /// `caller`'s own checks, with its token groups.
    pub async fn decide(&self, caller: &Acting, checks: &[Check]) -> Result<Vec<Decision>> {
        Ok(self.policy.check_batch(Some(&caller.principal), checks).await?.1)
    }

    /// Whether `caller` holds any permission on each bundle: one query.
    pub async fn visible_bundles(&self, caller: &Acting, names: Vec<String>) -> Result<Vec<String>> {
        const ANY: [Permission; 4] = [Permission::View, Permission::Update, Permission::Use, Permission::ManageBundle];
        let checks: Vec<Check> = names
            .iter()
            .flat_map(|b| {
                ANY.iter().map(|p| Check {
                    subject: caller.principal.clone(),
                    permission: *p,
                    target: Target::Bundle(b.clone()),
                    token_groups: token_groups(caller),
                })
            })
            .collect();
        let (_, decisions) = self.policy.check_batch(Some(&caller.principal), &checks).await?;
        Ok(names
            .into_iter()
            .zip(decisions.chunks(ANY.len()))
            .filter(|(_, d)| d.iter().any(|d| d.allowed))
            .map(|(b, _)| b)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(subject: &str, groups: &[&str]) -> Check {
        Check {
            subject: subject.parse().unwrap(),
            permission: Permission::UseSecrets,
            target: Target::Domain("sales".into()),
            token_groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn a_forwarded_caller_asks_about_itself_only_and_claims_no_groups_unless_an_admin() {
        let alice: Principal = "user:alice".parse().unwrap();
        assert!(may_ask(Some(&alice), false, &[check("user:alice", &[])]).is_ok());
        let other = may_ask(Some(&alice), false, &[check("user:alice", &[]), check("user:bob", &[])]).unwrap_err();
        assert!(other.to_string().contains("may check its own permissions only"), "{other}");
        let groups = may_ask(Some(&alice), false, &[check("user:alice", &["admins"])]).unwrap_err();
        assert!(groups.to_string().contains("may not set groups"), "{groups}");
        assert!(may_ask(Some(&alice), true, &[check("user:bob", &["admins"])]).is_ok(), "an admin may");
        assert!(may_ask(None, false, &[check("user:bob", &["eng"])]).is_ok(), "a service's own call may");
    }
}
