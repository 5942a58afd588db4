//! Black-box tests of user-service's gRPC API.

use contracts::user::v1::{
    AuthenticateRequest, CreateUserRequest, GetUserRequest, ValidateTokenRequest,
};
use testkit::TestStack;
use tonic::Code;

use crate::helpers::assert_rejected;

#[tokio::test]
async fn bad_sign_up_input_is_rejected_with_the_field_named() -> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let mut users = stack.users().await?;
    let create = |email: &str, password: &str| CreateUserRequest {
        email: email.to_owned(),
        password: password.to_owned(),
    };
    assert_rejected(
        users.create_user(create("", "long enough pw")).await,
        Code::InvalidArgument,
        Some("email"),
    );
    assert_rejected(
        users
            .create_user(create("not-an-email", "long enough pw"))
            .await,
        Code::InvalidArgument,
        Some("email"),
    );
    assert_rejected(
        users.create_user(create("a@example.com", "short")).await,
        Code::InvalidArgument,
        Some("password"),
    );
    let both = users
        .create_user(create("", ""))
        .await
        .expect_err("rejected");
    assert_eq!(
        crate::helpers::violated_fields(&both),
        ["email", "password"]
    );

    users
        .create_user(create("Ada@Example.com", "long enough pw"))
        .await?;
    assert_rejected(
        users
            .create_user(create(" ada@example.COM ", "another password"))
            .await,
        Code::AlreadyExists,
        Some("email"),
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn authentication_gives_a_token_that_validates_and_refuses_bad_credentials()
-> anyhow::Result<()> {
    let stack = TestStack::start().await?;
    let mut users = stack.users().await?;
    let created = users
        .create_user(CreateUserRequest {
            email: "grace@example.com".to_owned(),
            password: "hopper rules 1906".to_owned(),
        })
        .await?
        .into_inner()
        .user
        .expect("user");
    assert_eq!(created.email, "grace@example.com");

    let auth = |email: &str, password: &str| AuthenticateRequest {
        email: email.to_owned(),
        password: password.to_owned(),
    };
    let wrong_password = users
        .authenticate(auth("grace@example.com", "wrong password"))
        .await;
    let unknown_email = users
        .authenticate(auth("nobody@example.com", "hopper rules 1906"))
        .await;
    let (a, b) = (
        wrong_password.expect_err("rejected"),
        unknown_email.expect_err("rejected"),
    );
    assert_eq!(
        (a.code(), b.code()),
        (Code::Unauthenticated, Code::Unauthenticated)
    );
    assert_eq!(
        a.message(),
        b.message(),
        "the two failures must be indistinguishable"
    );
    assert_rejected(
        users.authenticate(auth("", "")).await,
        Code::InvalidArgument,
        Some("email"),
    );

    let token = users
        .authenticate(auth("GRACE@example.com", "hopper rules 1906"))
        .await?
        .into_inner();
    assert_eq!(token.user_id, created.id);
    let validated = users
        .validate_token(ValidateTokenRequest {
            access_token: token.access_token.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(validated.user_id, created.id);
    assert_rejected(
        users
            .validate_token(ValidateTokenRequest {
                access_token: "eyJhbGciOiJIUzI1NiJ9.e30.AAAA".to_owned(),
            })
            .await,
        Code::Unauthenticated,
        None,
    );
    assert_rejected(
        users
            .validate_token(ValidateTokenRequest {
                access_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
        Some("access_token"),
    );

    let fetched = users
        .get_user(testkit::bearer(
            &token.access_token,
            GetUserRequest {
                user_id: created.id.clone(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(fetched.user, Some(created));
    assert_rejected(
        users
            .get_user(testkit::bearer(
                &token.access_token,
                GetUserRequest {
                    user_id: "42".to_owned(),
                },
            ))
            .await,
        Code::InvalidArgument,
        Some("user_id"),
    );
    assert_rejected(
        users
            .get_user(testkit::bearer(
                &token.access_token,
                GetUserRequest {
                    user_id: uuid::Uuid::new_v4().to_string(),
                },
            ))
            .await,
        Code::NotFound,
        None,
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_expired_token_is_refused_everywhere() -> anyhow::Result<()> {
    let stack = TestStack::start_with(|auth| auth.token_ttl_secs = 4).await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut users = stack.users().await?;
    let validate = |t: &str| ValidateTokenRequest {
        access_token: t.to_owned(),
    };
    users.validate_token(validate(&token)).await?;
    tokio::time::sleep(std::time::Duration::from_millis(5100)).await;
    let expired = users
        .validate_token(validate(&token))
        .await
        .expect_err("expired");
    assert_eq!(expired.code(), Code::Unauthenticated);
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );
    let mut orders = stack.orders().await?;
    assert_rejected(
        orders
            .create_order(testkit::bearer(
                &token,
                crate::helpers::order(vec![crate::helpers::item("A", 1, 1)]),
            ))
            .await,
        Code::Unauthenticated,
        None,
    );
    stack.stop().await;
    Ok(())
}

/// Tokens signed with a retired key keep working while that key is listed
/// for verification, and stop when it is removed.
#[tokio::test]
async fn signing_keys_rotate_without_logging_anyone_out() -> anyhow::Result<()> {
    testkit::init_logging();
    let nats = testkit::NatsServer::start().await?;
    let db = testkit::TestDb::create("rotation").await?;
    let old_key = "old-key-old-key-old-key-old-key-!";
    let new_key = "new-key-new-key-new-key-new-key-!";
    let start = |key_id: &str, key: &str, verification: &str| {
        let settings = user_service::Settings {
            grpc_addr: "127.0.0.1:0".to_owned(),
            admin_addr: "127.0.0.1:0".to_owned(),
            database_url: platform::config::DatabaseUrl::new(db.url.clone()),
            nats_url: nats.url(),
            auth: user_service::config::AuthSettings {
                signing_key: platform::config::Secret::new(key),
                key_id: key_id.to_owned(),
                verification_keys: platform::config::Secret::new(verification),
                ..user_service::Settings::default().auth
            },
            ..Default::default()
        };
        async move {
            let app = user_service::Application::build(settings).await?;
            let addr = app.grpc_addr();
            let stop = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(app.run_until_stopped(stop.clone()));
            let client = contracts::user::v1::user_service_client::UserServiceClient::connect(
                format!("http://{addr}"),
            )
            .await?;
            anyhow::Ok((client, stop, task))
        }
    };
    let (mut first, stop, task) = start("k1", old_key, "").await?;
    first
        .create_user(CreateUserRequest {
            email: "rotate@example.com".to_owned(),
            password: "long enough pw".to_owned(),
        })
        .await?;
    let token = first
        .authenticate(AuthenticateRequest {
            email: "rotate@example.com".to_owned(),
            password: "long enough pw".to_owned(),
        })
        .await?
        .into_inner()
        .access_token;
    stop.cancel();
    task.await??;

    let validate = || ValidateTokenRequest {
        access_token: token.clone(),
    };
    let (mut rotated, stop, task) = start("k2", new_key, &format!("k1={old_key}")).await?;
    rotated.validate_token(validate()).await?;
    stop.cancel();
    task.await??;

    let (mut retired, stop, task) = start("k2", new_key, "").await?;
    assert_rejected(
        retired.validate_token(validate()).await,
        Code::Unauthenticated,
        None,
    );
    stop.cancel();
    task.await??;
    Ok(())
}
