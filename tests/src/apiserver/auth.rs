//! Authentication: who a request comes from, read from its bearer token, as the real API server's
//! token authenticators do it.
//!
//! Owns the token table (the admin's static token, and service-account tokens shaped as the JWTs
//! the kubelet projects into a pod), the users they stand for (name and groups, with
//! `system:authenticated` and the service-account groups added as the real server adds them),
//! and the reading of the `Authorization` header. A service-account token stays valid while its
//! ServiceAccount exists with the uid it names and until it expires; the caller looks the
//! account up. The signature part of a token is random bytes the server remembers, standing in
//! for a signature check. Pure apart from the random bytes; never panics on client input.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use super::error::ApiError;

/// Issuer and audience of service-account tokens, as a kubeadm cluster sets them.
pub(crate) const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How long a minted service-account token is valid (the kubelet asks for one hour and gets
/// 3607 s, renewing it at 80 %).
const TOKEN_LIFETIME_SECONDS: u64 = 3607;

/// An authenticated user: what RBAC decides on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    /// User name, e.g. `system:serviceaccount:kube-system:ferrox`.
    pub name: String,
    /// Groups, `system:authenticated` included.
    pub groups: Vec<String>,
}

impl User {
    /// The admin: `system:masters`, whom authorization never refuses (as kubeadm's
    /// `super-admin.conf`).
    pub(crate) fn admin() -> Self {
        User {
            name: "kubernetes-admin".to_owned(),
            groups: vec!["system:masters".to_owned(), AUTHENTICATED.to_owned()],
        }
    }

    /// A ServiceAccount's user, with the groups the real token authenticator gives it.
    pub(crate) fn service_account(namespace: &str, name: &str) -> Self {
        User {
            name: service_account_user(namespace, name),
            groups: vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                AUTHENTICATED.to_owned(),
            ],
        }
    }

    /// Whether authorization lets this user do anything (the `system:masters` group).
    pub(crate) fn is_superuser(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// The group of every authenticated user.
pub(crate) const AUTHENTICATED: &str = "system:authenticated";

/// `system:serviceaccount:{namespace}:{name}`.
pub(crate) fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// What a known token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Bearer {
    Admin,
    ServiceAccount {
        namespace: String,
        name: String,
        /// The uid of the ServiceAccount the token was issued for.
        uid: String,
        /// Unix time after which the token is refused.
        expires: u64,
    },
}

/// The tokens this server issued.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tokens {
    tokens: BTreeMap<String, Bearer>,
}

impl Tokens {
    /// A table with one admin token, returned with it.
    pub(crate) fn with_admin() -> (Self, String) {
        let mut tokens = Tokens::default();
        let admin = format!("admin-{}", hex(&random_bytes(16)));
        tokens.tokens.insert(admin.clone(), Bearer::Admin);
        (tokens, admin)
    }

    /// Mints a token for ServiceAccount `namespace/name` (uid `uid`), shaped as the projected
    /// token a pod gets: `header.claims.signature`, base64url, RS256, audience the API server.
    pub(crate) fn mint_service_account(
        &mut self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> String {
        let now = unix_now();
        let expires = now + TOKEN_LIFETIME_SECONDS;
        let header = json!({ "alg": "RS256", "kid": hex(&random_bytes(20)) });
        let claims = json!({
            "aud": [ISSUER],
            "exp": expires,
            "iat": now,
            "iss": ISSUER,
            "jti": hex(&random_bytes(16)),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": { "name": name, "uid": uid },
            },
            "nbf": now,
            "sub": service_account_user(namespace, name),
        });
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            // An RS256 signature of a 2048-bit key is 256 bytes.
            URL_SAFE_NO_PAD.encode(random_bytes(256)),
        );
        self.tokens.insert(
            token.clone(),
            Bearer::ServiceAccount {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                uid: uid.to_owned(),
                expires,
            },
        );
        token
    }

    /// What the `Authorization` header's bearer token stands for; 401 for a missing header,
    /// another scheme, an unknown token or an expired one.
    pub(crate) fn bearer(&self, authorization: &str) -> Result<&Bearer, ApiError> {
        let mut parts = authorization.trim().splitn(2, ' ');
        let scheme = parts.next().unwrap_or_default();
        let token = parts.next().unwrap_or_default().trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(ApiError::Unauthorized);
        }
        match self.tokens.get(token) {
            Some(Bearer::ServiceAccount { expires, .. }) if *expires < unix_now() => {
                Err(ApiError::Unauthorized)
            }
            Some(bearer) => Ok(bearer),
            None => Err(ApiError::Unauthorized),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `n` bytes from the kernel's random source.
pub(crate) fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own.
        let got = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), n - filled, 0) };
        match usize::try_from(got) {
            Ok(got) => filled += got,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                assert!(
                    err.kind() == std::io::ErrorKind::Interrupted,
                    "getrandom: {err}"
                );
            }
        }
    }
    buf
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_account_token_looks_like_a_projected_one() {
        let mut tokens = Tokens::default();
        let token = tokens.mint_service_account("kube-system", "ferrox", "uid-1");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{token}");
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "system:serviceaccount:kube-system:ferrox");
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(
            claims["kubernetes.io"]["serviceaccount"]["uid"], "uid-1",
            "{claims}"
        );
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 256);
        assert_eq!(
            tokens.bearer(&format!("Bearer {token}")),
            Ok(&Bearer::ServiceAccount {
                namespace: "kube-system".into(),
                name: "ferrox".into(),
                uid: "uid-1".into(),
                expires: claims["exp"].as_u64().unwrap(),
            })
        );
    }

    #[test]
    fn anything_but_a_known_bearer_token_is_401() {
        let (mut tokens, admin) = Tokens::with_admin();
        let sa = tokens.mint_service_account("kube-system", "ferrox", "u");
        assert_eq!(
            tokens.bearer(&format!("bearer {admin}")),
            Ok(&Bearer::Admin)
        );
        let mut forged = sa.clone();
        forged.pop();
        forged.push(if sa.ends_with('A') { 'B' } else { 'A' });
        for bad in [
            String::new(),
            "Bearer".to_owned(),
            "Bearer ".to_owned(),
            format!("Basic {admin}"),
            format!("Bearer {forged}"),
            format!("Bearer {admin}x"),
        ] {
            assert_eq!(
                tokens.bearer(&bad),
                Err(ApiError::Unauthorized),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn service_account_users_carry_the_real_groups() {
        let u = User::service_account("kube-system", "ferrox");
        assert_eq!(u.name, "system:serviceaccount:kube-system:ferrox");
        assert_eq!(
            u.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:kube-system",
                "system:authenticated"
            ]
        );
        assert!(!u.is_superuser());
        assert!(User::admin().is_superuser());
    }
}
