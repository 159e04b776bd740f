//! Who may do what with a Vault config, through the gateway: every Vault
//! config RPC, resolution of a VAULT object and the selector, for each
//! persona, acting through a platform-service token; on SQLite and
//! PostgreSQL, against a real OpenBao.

use integration_tests::{on_both_databases, openbao::OpenBao, *};
use secrets_proto::v1::{self as pb, Permission};
use tonic::Code;

on_both_databases!(every_vault_rpc_is_allowed_exactly_for_the_personas_that_hold_its_permission);

const BUNDLE: &str = "finance-vault";

/// The personas and what they hold on finance-vault. `view-direct` holds
/// VIEW granted to the user, `view-group` through group:view-holders,
/// `view-nested` through group:view-inner ∈ group:view-holders-outer; the
/// same for UPDATE and USE.
const PERSONAS: [&str; 16] = [
    "admin",  // platform admin
    "olivia", // owns domain finance, nothing on the bundle
    "bgroup", // owns the bundle through group:owners
    "view-direct",
    "view-group",
    "view-nested",
    "update-direct",
    "update-group",
    "update-nested",
    "use-direct",
    "use-group",
    "use-nested",
    "bowner", // owns another bundle
    "lisa",   // LIST_SECRETS in finance
    "nina",   // finance member, no permission
    "eve",    // nothing at all
];

fn holders(permission: &str) -> [String; 3] {
    ["direct", "group", "nested"].map(|how| format!("{permission}-{how}"))
}

/// Domain owners view, update and delete their domain's configs (USE comes
/// from the bundle only); UPDATE includes VIEW.
fn allowed(op: &str) -> Vec<String> {
    let mut who: Vec<String> = vec!["admin".into(), "bgroup".into()];
    match op {
        "create" => return vec!["admin".into()],
        "get" | "list" => {
            who.push("olivia".into());
            who.extend(holders("view"));
            who.extend(holders("update"));
        }
        "update" | "test" | "delete" => {
            who.push("olivia".into());
            who.extend(holders("update"));
        }
        "keys" | "resolve" => who.extend(holders("use")),
        // LIST_SECRETS in finance and USE on the bundle.
        "selector" => return vec!["admin".into()],
        _ => unreachable!("unknown operation {op}"),
    }
    who
}

/// How a refused persona is refused: one who may not VIEW the config is
/// told it does not exist, so the denial tells nothing about it (USE alone
/// lists its keys, never its details).
fn refusal(op: &str, who: &str) -> Code {
    let knows = allowed("get").iter().any(|a| a == who);
    match op {
        "get" | "update" | "test" | "delete" | "keys" if !knows => Code::NotFound,
        _ => Code::PermissionDenied,
    }
}

fn token(t: &str) -> pb::VaultCredentials {
    pb::VaultCredentials { method: Some(pb::vault_credentials::Method::Token(t.into())) }
}

async fn setup(app: &TestApp, bao: &OpenBao) -> String {
    app.setup_domain("finance").await;
    bao.bao(&["kv", "put", "secret/production", "db_password=pw"]);
    let mut authz = app.as_user(ADMIN).authz.clone();
    let mut memberships = vec![("owners".to_string(), "user:bgroup".to_string())];
    for p in ["view", "update", "use"] {
        memberships.push((format!("{p}-holders"), format!("user:{p}-group")));
        memberships.push((format!("{p}-inner"), format!("user:{p}-nested")));
        memberships.push((format!("{p}-holders-outer"), format!("group:{p}-inner")));
    }
    for (group, member) in memberships {
        let _ = authz.create_group(pb::CreateGroupRequest { name: group.clone(), description: String::new() }).await;
        authz.add_group_member(pb::AddGroupMemberRequest { group, member }).await.unwrap();
    }
    for (name, owner) in [(BUNDLE, "group:owners"), ("other-vault", "user:bowner")] {
        authz
            .create_bundle(pb::CreateBundleRequest {
                name: name.into(),
                description: String::new(),
                owner: owner.into(),
            })
            .await
            .unwrap();
    }
    for (p, permission) in [("view", Permission::View), ("update", Permission::Update), ("use", Permission::Use)] {
        for subject in [format!("user:{p}-direct"), format!("group:{p}-holders"), format!("group:{p}-holders-outer")] {
            authz
                .grant_bundle_permission(pb::GrantBundlePermissionRequest {
                    bundle: BUNDLE.into(),
                    subject,
                    permission: permission as i32,
                })
                .await
                .unwrap();
        }
    }
    create_config(app, bao, ADMIN, "prod").await.unwrap().id
}

fn spec(bao: &OpenBao, name: &str) -> pb::VaultConfigSpec {
    pb::VaultConfigSpec {
        name: name.into(),
        host: bao.addr.clone(),
        path: "/v1/secret/data/production".into(),
        credentials: Some(token(&bao.root_token)),
        ..Default::default()
    }
}

async fn create_config(app: &TestApp, bao: &OpenBao, who: &str, name: &str) -> Result<pb::VaultConfig, tonic::Status> {
    app.as_service(Some(&format!("user:{who}")))
        .vault
        .clone()
        .create_vault_config(pb::CreateVaultConfigRequest {
            domain: "finance".into(),
            bundle: BUNDLE.into(),
            spec: Some(spec(bao, name)),
        })
        .await
        .map(|r| r.into_inner())
}

/// Runs `op` as `c`; Ok(()) when allowed, the refusal otherwise.
async fn attempt(
    app: &TestApp,
    bao: &OpenBao,
    c: &Clients,
    op: &str,
    id: &str,
    who: &str,
) -> Result<(), tonic::Status> {
    let mut vault = c.vault.clone();
    let mut gateway = c.gateway.clone();
    match op {
        "create" => {
            let request = pb::CreateVaultConfigRequest {
                domain: "finance".into(),
                bundle: BUNDLE.into(),
                spec: Some(spec(bao, &format!("by-{who}"))),
            };
            vault.create_vault_config(request).await.map(drop)
        }
        "get" => vault.get_vault_config(pb::GetVaultConfigRequest { id: id.into() }).await.map(drop),
        "list" => {
            let listed = vault
                .list_vault_configs(pb::ListVaultConfigsRequest { domain: "finance".into() })
                .await?
                .into_inner()
                .configs;
            if listed.iter().any(|c| c.id == id) { Ok(()) } else { Err(tonic::Status::permission_denied("not listed")) }
        }
        "update" => vault
            .update_vault_config(pb::UpdateVaultConfigRequest {
                id: id.into(),
                namespace: Some(String::new()),
                ..Default::default()
            })
            .await
            .map(drop),
        "test" => vault
            .test_vault_connection(pb::TestVaultConnectionRequest {
                target: Some(pb::test_vault_connection_request::Target::Id(id.into())),
            })
            .await
            .map(drop),
        "delete" => {
            // Each allowed persona deletes a config of its own.
            let own = create_config(app, bao, ADMIN, &format!("doomed-{who}")).await.unwrap();
            let result = vault
                .delete_vault_config(pb::DeleteVaultConfigRequest { id: own.id.clone(), force: false })
                .await
                .map(drop);
            if result.is_err() {
                let mut admin = app.as_user(ADMIN).vault.clone();
                admin.delete_vault_config(pb::DeleteVaultConfigRequest { id: own.id, force: false }).await.unwrap();
            }
            result
        }
        "keys" => vault.list_vault_keys(pb::ListVaultKeysRequest { id: id.into() }).await.map(drop),
        "resolve" => {
            let out = gateway
                .resolve_secrets(pb::ResolveSecretsRequest {
                    domain: "finance".into(),
                    items: vec![vault_item("x", id, "db_password")],
                })
                .await?
                .into_inner()
                .items;
            match &out[0].result {
                Some(pb::resolved_item::Result::Value(v)) if v == b"pw" => Ok(()),
                Some(pb::resolved_item::Result::Error(e)) => {
                    Err(tonic::Status::new(Code::from_i32(e.code), e.message.clone()))
                }
                other => panic!("{who} resolve: {other:?}"),
            }
        }
        "selector" => {
            let listed = gateway
                .list_selectable_secrets(pb::ListSelectableSecretsRequest { domain: "finance".into() })
                .await?
                .into_inner();
            if listed.secrets.iter().any(|s| s.label == "prod") {
                Ok(())
            } else {
                Err(tonic::Status::permission_denied("no vault keys listed"))
            }
        }
        _ => unreachable!(),
    }
}

const OPS: [&str; 10] = ["create", "get", "list", "update", "test", "delete", "keys", "resolve", "selector", "list"];

async fn every_vault_rpc_is_allowed_exactly_for_the_personas_that_hold_its_permission(app: TestApp) {
    let bao = OpenBao::start();
    let id = setup(&app, &bao).await;
    let mut checked = 0;
    for op in OPS {
        for who in PERSONAS {
            let clients = app.as_service(Some(&format!("user:{who}")));
            let result = attempt(&app, &bao, &clients, op, &id, who).await;
            let expected = allowed(op).iter().any(|a| a == who);
            match (&result, expected) {
                (Ok(()), true) => {}
                (Err(e), false) => {
                    assert_eq!(e.code(), refusal(op, who), "{who} {op}: refused with the wrong code: {e:?}");
                    if e.code() == Code::NotFound {
                        assert!(!e.message().contains("prod") && !e.message().contains(BUNDLE), "{who} {op}: {e:?}");
                    }
                }
                (Ok(()), false) => panic!("{who} may {op}, but should not"),
                (Err(e), true) => panic!("{who} should be allowed to {op}: {e:?}"),
            }
            checked += 1;
        }
        let anonymous = app.anonymous();
        let err = attempt(&app, &bao, &anonymous, op, &id, "anonymous").await;
        if op != "delete" {
            assert_eq!(err.unwrap_err().code(), Code::Unauthenticated, "anonymous {op}");
        }
    }
    assert_eq!(checked, OPS.len() * PERSONAS.len());
}
