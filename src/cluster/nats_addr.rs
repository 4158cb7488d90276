//! `cluster.nats_url`: one NATS server or several (a NATS cluster), comma-separated, each
//! `nats://` or `tls://`, and the credentials in them. Sans-IO: the bus connects with what
//! [`parse`] returns, and everything that prints the setting prints [`redacted`].
//!
//! Credentials ride in the URL as NATS clients spell them: `nats://user:password@host:4222`
//! signs in with a user and password, `nats://token@host:4222` with a token. Characters
//! outside `A-Z a-z 0-9 - . _ ~` in them are percent-encoded (`%40` for `@`). The NATS
//! client takes credentials from its options, not from the address, so they are taken out
//! of the addresses here; every address that carries credentials must carry the same ones.

/// How the bus signs in to NATS.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    UserPassword { user: String, password: String },
    Token(String),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
        }
    }
}

/// The servers to try (without credentials) and the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsTarget {
    pub servers: Vec<String>,
    pub auth: Option<NatsAuth>,
}

/// Reads `cluster.nats_url`; the error says what is wrong with it (never a secret).
pub fn parse(urls: &str) -> Result<NatsTarget, String> {
    let mut servers = Vec::new();
    let mut auth: Option<NatsAuth> = None;
    for (i, raw) in urls.split(',').enumerate() {
        let raw = raw.trim();
        let n = i + 1;
        let mut u = url::Url::parse(raw).map_err(|e| format!("address {n} is not a URL: {e}"))?;
        if u.scheme() != "nats" && u.scheme() != "tls" {
            return Err(format!(
                "address {n} must be nats:// or tls:// (e.g. nats://127.0.0.1:4222)"
            ));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(format!("address {n} names no host"));
        }
        if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
            return Err(format!(
                "address {n} must be scheme://host:port, nothing after it"
            ));
        }
        let user = decode(u.username()).ok_or(format!("address {n}: bad %-escape in the user"))?;
        let password = match u.password() {
            Some(p) => Some(decode(p).ok_or(format!("address {n}: bad %-escape in the password"))?),
            None => None,
        };
        let this = match (user.is_empty(), password) {
            (true, None) => None,
            (true, Some(_)) => return Err(format!("address {n} has a password but no user")),
            (false, None) => Some(NatsAuth::Token(user)),
            (false, Some(password)) => Some(NatsAuth::UserPassword { user, password }),
        };
        if let Some(this) = this {
            match &auth {
                Some(a) if *a != this => {
                    return Err("the addresses carry different credentials".to_string())
                }
                _ => auth = Some(this),
            }
        }
        let _ = u.set_username("");
        let _ = u.set_password(None);
        servers.push(u.to_string().trim_end_matches('/').to_string());
    }
    Ok(NatsTarget { servers, auth })
}

/// `cluster.nats_url` for logs and `check-config`: passwords and tokens as `***`.
pub fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|raw| {
            let raw = raw.trim();
            match url::Url::parse(raw) {
                Ok(mut u) => {
                    if u.password().is_some() {
                        let _ = u.set_password(Some("***"));
                    } else if !u.username().is_empty() {
                        let _ = u.set_username("***");
                    }
                    u.to_string().trim_end_matches('/').to_string()
                }
                // Not a URL: nothing can be told apart from a secret in it.
                Err(_) => "<unparsable>".to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Percent-decoding of a URL's user or password (`None`: a bad escape or not UTF-8).
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_server_without_credentials() {
        let t = parse("nats://127.0.0.1:4222").unwrap();
        assert_eq!(t.servers, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(t.auth, None);
    }

    #[test]
    fn several_servers_and_a_user_with_an_escaped_password() {
        let t = parse("nats://torpor:p%40ss%3Aw@10.0.0.1:4222, tls://torpor:p%40ss%3Aw@n2:4222")
            .unwrap();
        assert_eq!(t.servers, vec!["nats://10.0.0.1:4222", "tls://n2:4222"]);
        assert_eq!(
            t.auth,
            Some(NatsAuth::UserPassword {
                user: "torpor".into(),
                password: "p@ss:w".into()
            })
        );
        assert!(
            !format!("{t:?}").contains("p@ss"),
            "Debug hides the password"
        );
    }

    #[test]
    fn a_user_alone_is_a_token_and_one_address_may_carry_it_for_all() {
        let t = parse("nats://s3cret@a:4222,nats://b:4222").unwrap();
        assert_eq!(t.auth, Some(NatsAuth::Token("s3cret".into())));
        assert_eq!(t.servers, vec!["nats://a:4222", "nats://b:4222"]);
    }

    #[test]
    fn bad_addresses_are_refused_without_their_secrets() {
        for (url, want) in [
            ("http://a:4222", "must be nats:// or tls://"),
            ("nats://", "names no host"),
            ("nats://a:4222/x", "nothing after it"),
            ("nats://:pw@a:4222", "password but no user"),
            ("nats://u:p%zz@a:4222", "bad %-escape in the password"),
            (
                "nats://u:one@a:4222,nats://u:two@b:4222",
                "different credentials",
            ),
            ("a:4222", "must be nats:// or tls://"),
        ] {
            let err = parse(url).unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
            assert!(!err.contains("one") && !err.contains("pw"), "{url}: {err}");
        }
    }

    #[test]
    fn redacted_hides_passwords_and_tokens() {
        assert_eq!(
            redacted("nats://u:hunter2@a:4222,nats://tok@b:4222,nats://c:4222"),
            "nats://u:***@a:4222,nats://***@b:4222,nats://c:4222"
        );
        assert_eq!(redacted("not a url hunter2"), "<unparsable>");
    }
}
