//! Who may do what: domain members and their permissions, platform admins,
//! groups, bundles and their grants.

use clap::{Args, Subcommand, ValueEnum};
use secrets_proto::v1::{self as pb, authz_service_client::AuthzServiceClient};
use serde::Serialize;

use crate::{
    connect::Authed,
    failure::Result,
    output::{self, Format},
};

type Client = AuthzServiceClient<Authed>;

#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// List a domain's members, their roles and permissions
    #[command(
        after_help = "Examples:\n  secretsctl member list -d finance\n  secretsctl member list -d finance -o json"
    )]
    List(DomainArg),
    /// Add a member (or change a member's role)
    #[command(
        after_help = "Examples:\n  secretsctl member add user:alice -d finance\n  secretsctl member add group:data-eng -d finance --owner"
    )]
    Add {
        /// user:NAME, service:NAME or group:NAME
        subject: String,
        #[command(flatten)]
        domain: DomainArg,
        /// An owner: everything inside the domain
        #[arg(long)]
        owner: bool,
    },
    /// Remove a member, with its permissions
    #[command(after_help = "Examples:\n  secretsctl member remove user:alice -d finance")]
    Remove {
        subject: String,
        #[command(flatten)]
        domain: DomainArg,
    },
}

#[derive(Args, Debug)]
pub struct DomainArg {
    /// The domain
    #[arg(short, long)]
    pub domain: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DomainPermission {
    ListSecrets,
    ManageSecrets,
}

#[derive(Subcommand, Debug)]
pub enum PermissionCommand {
    /// Grant a member a domain permission
    #[command(after_help = "Examples:\n  secretsctl permission grant user:alice list-secrets -d finance")]
    Grant(PermissionArgs),
    /// Revoke a member's domain permission
    #[command(after_help = "Examples:\n  secretsctl permission revoke user:alice list-secrets -d finance")]
    Revoke(PermissionArgs),
}

#[derive(Args, Debug)]
pub struct PermissionArgs {
    pub subject: String,
    #[arg(value_enum)]
    pub permission: DomainPermission,
    #[command(flatten)]
    pub domain: DomainArg,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// List the platform admins
    #[command(after_help = "Examples:\n  secretsctl admin list")]
    List,
    /// Make a subject a platform admin
    #[command(after_help = "Examples:\n  secretsctl admin grant user:carol")]
    Grant { subject: String },
    /// Revoke a granted platform admin (configured ones stay)
    #[command(after_help = "Examples:\n  secretsctl admin revoke user:carol")]
    Revoke { subject: String },
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List the groups and their members
    #[command(after_help = "Examples:\n  secretsctl group list -o yaml")]
    List,
    /// Create a group
    #[command(after_help = "Examples:\n  secretsctl group create data-eng --description \"data engineers\"")]
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a group
    #[command(after_help = "Examples:\n  secretsctl group delete data-eng")]
    Delete { name: String },
    /// Add a member (a user, a service or another group)
    #[command(
        after_help = "Examples:\n  secretsctl group add-member data-eng user:alice\n  secretsctl group add-member eng group:data-eng"
    )]
    AddMember { group: String, member: String },
    /// Remove a member
    #[command(after_help = "Examples:\n  secretsctl group remove-member data-eng user:alice")]
    RemoveMember { group: String, member: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BundlePermission {
    View,
    Update,
    Use,
}

#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// List the bundles
    #[command(after_help = "Examples:\n  secretsctl bundle list")]
    List,
    /// Show a bundle: owner, grants, resources
    #[command(after_help = "Examples:\n  secretsctl bundle get finance-vault -o json")]
    Get { name: String },
    /// Create a bundle (platform admins)
    #[command(after_help = "Examples:\n  secretsctl bundle create finance-vault --owner user:olivia")]
    Create {
        name: String,
        /// Its owner: a user or a group
        #[arg(long)]
        owner: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Change a bundle's description or owner
    #[command(after_help = "Examples:\n  secretsctl bundle update finance-vault --description \"finance's Vault\"")]
    Update {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// A new owner (platform admins)
        #[arg(long)]
        owner: Option<String>,
    },
    /// Delete a bundle
    #[command(after_help = "Examples:\n  secretsctl bundle delete finance-vault")]
    Delete { name: String },
    /// Grant a subject VIEW, UPDATE or USE on the bundle's resources
    #[command(after_help = "Examples:\n  secretsctl bundle grant finance-vault group:eng use")]
    Grant {
        name: String,
        subject: String,
        #[arg(value_enum)]
        permission: BundlePermission,
    },
    /// Revoke a grant
    #[command(after_help = "Examples:\n  secretsctl bundle revoke finance-vault group:eng use")]
    Revoke {
        name: String,
        subject: String,
        #[arg(value_enum)]
        permission: BundlePermission,
    },
}

fn permission_name(p: i32) -> String {
    pb::Permission::try_from(p).unwrap_or_default().as_str_name().to_string()
}

/// A domain member: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Member {
    pub domain: String,
    pub subject: String,
    /// OWNER or MEMBER.
    pub role: String,
    pub permissions: Vec<String>,
}

impl From<pb::DomainMember> for Member {
    fn from(m: pb::DomainMember) -> Self {
        let role =
            pb::DomainRole::try_from(m.role).unwrap_or_default().as_str_name().trim_start_matches("DOMAIN_ROLE_");
        Member {
            role: role.to_string(),
            permissions: m.permissions.into_iter().map(permission_name).collect(),
            domain: m.domain,
            subject: m.subject,
        }
    }
}

fn print_members(format: Format, members: Vec<Member>) -> Result<()> {
    output::print(format, &members, |members| {
        let rows: Vec<Vec<String>> =
            members.iter().map(|m| vec![m.subject.clone(), m.role.clone(), m.permissions.join(",")]).collect();
        output::table(&["SUBJECT", "ROLE", "PERMISSIONS"], &rows);
    })
}

pub async fn member(command: MemberCommand, mut client: Client, format: Format) -> Result<()> {
    let member = match command {
        MemberCommand::List(d) => {
            let listed = client.list_domain_members(pb::ListDomainMembersRequest { domain: d.domain }).await?;
            return print_members(format, listed.into_inner().members.into_iter().map(Member::from).collect());
        }
        MemberCommand::Add { subject, domain, owner } => {
            let role = if owner { pb::DomainRole::Owner } else { pb::DomainRole::Member };
            let request = pb::AddDomainMemberRequest { domain: domain.domain, subject, role: role as i32 };
            client.add_domain_member(request).await?.into_inner()
        }
        MemberCommand::Remove { subject, domain } => {
            let request = pb::RemoveDomainMemberRequest { domain: domain.domain.clone(), subject: subject.clone() };
            client.remove_domain_member(request).await?;
            let done = Done { done: format!("removed {subject} from domain {}", domain.domain) };
            return output::print(format, &done, |d| outln!("{}", d.done));
        }
    };
    print_members(format, vec![Member::from(member)])
}

pub async fn permission(command: PermissionCommand, mut client: Client, format: Format) -> Result<()> {
    let pick = |p: DomainPermission| match p {
        DomainPermission::ListSecrets => pb::Permission::ListSecrets as i32,
        DomainPermission::ManageSecrets => pb::Permission::ManageSecrets as i32,
    };
    let member = match command {
        PermissionCommand::Grant(a) => {
            let request = pb::GrantDomainPermissionRequest {
                domain: a.domain.domain,
                subject: a.subject,
                permission: pick(a.permission),
            };
            client.grant_domain_permission(request).await?.into_inner()
        }
        PermissionCommand::Revoke(a) => {
            let request = pb::RevokeDomainPermissionRequest {
                domain: a.domain.domain,
                subject: a.subject,
                permission: pick(a.permission),
            };
            client.revoke_domain_permission(request).await?.into_inner()
        }
    };
    print_members(format, vec![Member::from(member)])
}

/// A platform admin: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Admin {
    pub subject: String,
    /// Named in the authz-service's configuration: cannot be revoked here.
    pub from_configuration: bool,
}

/// What a command without an answer of its own did.
#[derive(Serialize)]
pub struct Done {
    pub done: String,
}

pub async fn admin(command: AdminCommand, mut client: Client, format: Format) -> Result<()> {
    let done = match command {
        AdminCommand::List => {
            let listed = client.list_platform_admins(pb::ListPlatformAdminsRequest {}).await?.into_inner();
            let admins: Vec<Admin> = listed
                .admins
                .into_iter()
                .map(|a| Admin { subject: a.subject, from_configuration: a.from_configuration })
                .collect();
            return output::print(format, &admins, |admins| {
                let rows: Vec<Vec<String>> = admins
                    .iter()
                    .map(|a| {
                        vec![a.subject.clone(), if a.from_configuration { "configuration" } else { "granted" }.into()]
                    })
                    .collect();
                output::table(&["SUBJECT", "FROM"], &rows);
            });
        }
        AdminCommand::Grant { subject } => {
            client.grant_platform_admin(pb::GrantPlatformAdminRequest { subject: subject.clone() }).await?;
            format!("{subject} is a platform admin")
        }
        AdminCommand::Revoke { subject } => {
            client.revoke_platform_admin(pb::RevokePlatformAdminRequest { subject: subject.clone() }).await?;
            format!("{subject} is no longer a platform admin")
        }
    };
    output::print(format, &Done { done }, |d| outln!("{}", d.done))
}

/// A group: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Group {
    pub name: String,
    pub description: String,
    pub members: Vec<String>,
}

impl From<pb::Group> for Group {
    fn from(g: pb::Group) -> Self {
        Group { name: g.name, description: g.description, members: g.members }
    }
}

fn print_groups(format: Format, groups: Vec<Group>) -> Result<()> {
    output::print(format, &groups, |groups| {
        let rows: Vec<Vec<String>> =
            groups.iter().map(|g| vec![g.name.clone(), g.members.join(","), g.description.clone()]).collect();
        output::table(&["GROUP", "MEMBERS", "DESCRIPTION"], &rows);
    })
}

pub async fn group(command: GroupCommand, mut client: Client, format: Format) -> Result<()> {
    let group = match command {
        GroupCommand::List => {
            let listed = client.list_groups(pb::ListGroupsRequest {}).await?.into_inner();
            return print_groups(format, listed.groups.into_iter().map(Group::from).collect());
        }
        GroupCommand::Create { name, description } => {
            client.create_group(pb::CreateGroupRequest { name, description }).await?.into_inner()
        }
        GroupCommand::Delete { name } => {
            client.delete_group(pb::DeleteGroupRequest { name: name.clone() }).await?;
            return output::print(format, &Done { done: format!("deleted group {name}") }, |d| outln!("{}", d.done));
        }
        GroupCommand::AddMember { group, member } => {
            client.add_group_member(pb::AddGroupMemberRequest { group, member }).await?.into_inner()
        }
        GroupCommand::RemoveMember { group, member } => {
            client.remove_group_member(pb::RemoveGroupMemberRequest { group, member }).await?.into_inner()
        }
    };
    print_groups(format, vec![Group::from(group)])
}

/// A bundle: `-o json` prints these fields.
#[derive(Serialize)]
pub struct Bundle {
    pub name: String,
    pub description: String,
    pub owner: String,
    pub grants: Vec<Grant>,
    pub resources: Vec<Resource>,
}

#[derive(Serialize)]
pub struct Grant {
    pub subject: String,
    pub permission: String,
}

#[derive(Serialize)]
pub struct Resource {
    /// VAULT_CONFIG.
    pub r#type: String,
    pub id: String,
}

impl From<pb::Bundle> for Bundle {
    fn from(b: pb::Bundle) -> Self {
        Bundle {
            name: b.name,
            description: b.description,
            owner: b.owner,
            grants: b
                .grants
                .into_iter()
                .map(|g| Grant { subject: g.subject, permission: permission_name(g.permission) })
                .collect(),
            resources: b
                .resources
                .into_iter()
                .map(|r| Resource {
                    r#type: pb::ResourceType::try_from(r.r#type).unwrap_or_default().as_str_name().to_string(),
                    id: r.id,
                })
                .collect(),
        }
    }
}

fn print_bundles(format: Format, bundles: Vec<Bundle>) -> Result<()> {
    output::print(format, &bundles, |bundles| {
        let rows: Vec<Vec<String>> = bundles
            .iter()
            .map(|b| {
                let grants: Vec<String> = b.grants.iter().map(|g| format!("{}:{}", g.subject, g.permission)).collect();
                vec![b.name.clone(), b.owner.clone(), grants.join(","), b.resources.len().to_string()]
            })
            .collect();
        output::table(&["BUNDLE", "OWNER", "GRANTS", "RESOURCES"], &rows);
    })
}

pub async fn bundle(command: BundleCommand, mut client: Client, format: Format) -> Result<()> {
    let pick = |p: BundlePermission| match p {
        BundlePermission::View => pb::Permission::View as i32,
        BundlePermission::Update => pb::Permission::Update as i32,
        BundlePermission::Use => pb::Permission::Use as i32,
    };
    let bundle = match command {
        BundleCommand::List => {
            let listed = client.list_bundles(pb::ListBundlesRequest {}).await?.into_inner();
            return print_bundles(format, listed.bundles.into_iter().map(Bundle::from).collect());
        }
        BundleCommand::Get { name } => client.get_bundle(pb::GetBundleRequest { name }).await?.into_inner(),
        BundleCommand::Create { name, owner, description } => {
            client.create_bundle(pb::CreateBundleRequest { name, description, owner }).await?.into_inner()
        }
        BundleCommand::Update { name, description, owner } => {
            let request = pb::UpdateBundleRequest { name, description, owner, new_name: None };
            client.update_bundle(request).await?.into_inner()
        }
        BundleCommand::Delete { name } => {
            client.delete_bundle(pb::DeleteBundleRequest { name: name.clone() }).await?;
            return output::print(format, &Done { done: format!("deleted bundle {name}") }, |d| outln!("{}", d.done));
        }
        BundleCommand::Grant { name, subject, permission } => {
            let request = pb::GrantBundlePermissionRequest { bundle: name, subject, permission: pick(permission) };
            client.grant_bundle_permission(request).await?.into_inner()
        }
        BundleCommand::Revoke { name, subject, permission } => {
            let request = pb::RevokeBundlePermissionRequest { bundle: name, subject, permission: pick(permission) };
            client.revoke_bundle_permission(request).await?.into_inner()
        }
    };
    print_bundles(format, vec![Bundle::from(bundle)])
}
