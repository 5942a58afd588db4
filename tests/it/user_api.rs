//! Black-box tests of user-service's gRPC API.

use contracts::user::v1::{
    AuthenticateRequest, CreateUserRequest, GetUserRequest, ValidateTokenRequest,
};
use testkit::TestStack;
use tonic::Code;

use crate::support::assert_rejected;

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
        crate::support::violated_fields(&both),
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
        .get_user(GetUserRequest {
            user_id: created.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(fetched.user, Some(created));
    assert_rejected(
        users
            .get_user(GetUserRequest {
                user_id: "42".to_owned(),
            })
            .await,
        Code::InvalidArgument,
        Some("user_id"),
    );
    assert_rejected(
        users
            .get_user(GetUserRequest {
                user_id: uuid::Uuid::new_v4().to_string(),
            })
            .await,
        Code::NotFound,
        None,
    );
    stack.stop().await;
    Ok(())
}
