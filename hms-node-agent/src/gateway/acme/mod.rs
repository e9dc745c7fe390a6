//! ACME (RFC 8555, HTTP-01) for gateway listeners' hostnames, with `instant-acme`. Owns the
//! account and certificate cache on disk, issuing and renewing certificates, and the
//! [`Challenges`] map (token -> key authorization) that a plain-HTTP listener answers from
//! at `/.well-known/acme-challenge/<token>`. Hands each new certificate to whoever serves it
//! (the gateway's `CertStore::insert`) as a `rustls::sign::CertifiedKey` for its hostname.
//! Must never serve a challenge it did not create, write keys readable by others (0600), or
//! let a failed renewal remove a certificate that still works: it keeps the last one and
//! tries again later.
//!
//! Renewal: a certificate is renewed once less than a third of its lifetime is left (Let's
//! Encrypt's 90 days: at 60), checked again at that moment; a failure is retried after a
//! backoff (5 s doubling to 10 min, never past the certificate's end).
//!
//! The cache (`<dir>/account.json`, `<dir>/certs/<host>.pem` and `.key`) lets a restarted
//! agent serve at once and keep its account.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;

/// Where HTTP-01 challenges are answered from: `token -> key authorization`.
#[derive(Clone, Debug, Default)]
pub struct Challenges {
    inner: Arc<RwLock<HashMap<String, String>>>,
}

/// The path prefix of HTTP-01 challenge requests (RFC 8555 §8.3).
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

impl Challenges {
    /// The key authorization for `token`, if a challenge for it is pending.
    pub fn get(&self, token: &str) -> Option<String> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    /// The body to answer a request for `path` with (`Some` only for a pending token under
    /// [`CHALLENGE_PREFIX`]); the answer's content type is `application/octet-stream`.
    pub fn answer(&self, path: &str) -> Option<String> {
        self.get(path.strip_prefix(CHALLENGE_PREFIX)?)
    }

    fn insert(&self, token: &str, key_authorization: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token.to_string(), key_authorization.to_string());
    }

    fn remove(&self, token: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token);
    }
}

/// What the ACME client needs to know.
#[derive(Clone, Debug)]
pub struct AcmeConfig {
    /// The CA's directory URL (e.g. Let's Encrypt's `https://acme-v02.api.letsencrypt.org/directory`).
    pub directory_url: String,
    /// A PEM root to trust for the directory's own TLS (a test CA such as pebble); none:
    /// the system's roots.
    pub directory_root: Option<PathBuf>,
    /// `mailto:` contacts for the account.
    pub contact: Vec<String>,
    /// The cache directory (created 0700).
    pub cache_dir: PathBuf,
}

/// One certificate the client holds.
#[derive(Clone)]
pub struct Held {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Held {
    /// When to renew: two thirds into its lifetime.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }
}

pub struct AcmeClient {
    config: AcmeConfig,
    challenges: Challenges,
    account: tokio::sync::OnceCell<Account>,
}

impl AcmeClient {
    pub fn new(config: AcmeConfig, challenges: Challenges) -> AcmeClient {
        AcmeClient {
            config,
            challenges,
            account: tokio::sync::OnceCell::new(),
        }
    }

    fn builder(&self) -> anyhow::Result<instant_acme::AccountBuilder> {
        Ok(match &self.config.directory_root {
            Some(root) => Account::builder_with_root(root)
                .with_context(|| format!("the ACME directory's root {}", root.display()))?,
            None => Account::builder().context("the ACME HTTP client")?,
        })
    }

    /// The account: from the cache, else registered now and cached (0600).
    async fn account(&self) -> anyhow::Result<&Account> {
        self.account
            .get_or_try_init(|| async {
                let path = self.config.cache_dir.join("account.json");
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let creds: AccountCredentials = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not an ACME account", path.display()))?;
                    return self
                        .builder()?
                        .from_credentials(creds)
                        .await
                        .with_context(|| {
                            format!("restoring the ACME account of {}", path.display())
                        });
                }
                let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
                let (account, creds) = self
                    .builder()?
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory_url.clone(),
                        None,
                    )
                    .await
                    .with_context(|| {
                        format!(
                            "registering an ACME account at {}",
                            self.config.directory_url
                        )
                    })?;
                write_private(&path, serde_json::to_string(&creds)?.as_bytes())?;
                tracing::info!(directory = %self.config.directory_url, "ACME account registered");
                Ok(account)
            })
            .await
    }

    fn cert_paths(&self, host: &str) -> (PathBuf, PathBuf) {
        let dir = self.config.cache_dir.join("certs");
        (
            dir.join(format!("{host}.pem")),
            dir.join(format!("{host}.key")),
        )
    }

    /// The cached certificate of `host`, if there is one that parses.
    pub fn cached(&self, host: &str) -> Option<Held> {
        let (cert, key) = self.cert_paths(host);
        let chain = std::fs::read_to_string(cert).ok()?;
        let key = std::fs::read_to_string(key).ok()?;
        held(&chain, &key).ok()
    }

    /// Orders a certificate for `host` over HTTP-01 and caches it.
    pub async fn issue(&self, host: &str) -> anyhow::Result<Held> {
        validate_hostname(host)?;
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(host.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .with_context(|| format!("ordering a certificate for {host}"))?;
        let mut tokens = Vec::new();
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.context("reading an authorization")?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => bail!("authorization for {host} is {other:?}"),
                }
                let mut challenge = authz
                    .challenge(ChallengeType::Http01)
                    .with_context(|| format!("the CA offers no HTTP-01 challenge for {host}"))?;
                let token = challenge.token.clone();
                self.challenges
                    .insert(&token, challenge.key_authorization().as_str());
                tokens.push(token);
                challenge
                    .set_ready()
                    .await
                    .context("telling the CA the challenge is ready")?;
            }
            let status = order
                .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(60)))
                .await
                .context("waiting for the CA to validate")?;
            if status != OrderStatus::Ready {
                bail!(
                    "the CA did not validate {host} (order {status:?}): is {host}:80 (the challenge listener) reachable from the CA?"
                );
            }
            let key_pem = order.finalize().await.context("finalizing the order")?;
            let chain_pem = order
                .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(60)))
                .await
                .context("downloading the certificate")?;
            Ok((chain_pem, key_pem))
        }
        .await;
        for t in &tokens {
            self.challenges.remove(t);
        }
        let (chain_pem, key_pem) = result?;
        let got = held(&chain_pem, &key_pem)?;
        let (cert, key) = self.cert_paths(host);
        write_private(&key, key_pem.as_bytes())?;
        write_private(&cert, chain_pem.as_bytes())?;
        tracing::info!(host, not_after = ?got.not_after, "ACME certificate issued");
        Ok(got)
    }

    /// Keeps a certificate for each of `hosts`: the cached one while it is not due, else a
    /// new one; `deliver(host, key)` gets each (the cached one at once). Runs until the
    /// future is dropped.
    pub async fn run(&self, hosts: Vec<String>, deliver: impl Fn(&str, Arc<CertifiedKey>)) {
        let mut held: HashMap<String, Held> = HashMap::new();
        let mut backoff: HashMap<String, Duration> = HashMap::new();
        for h in &hosts {
            if let Some(c) = self.cached(h) {
                deliver(h, c.key.clone());
                held.insert(h.clone(), c);
            }
        }
        loop {
            let now = SystemTime::now();
            let mut next = now + Duration::from_secs(3600);
            for h in &hosts {
                let due = held.get(h).is_none_or(|c| c.renew_at() <= now);
                if due {
                    match self.issue(h).await {
                        Ok(c) => {
                            deliver(h, c.key.clone());
                            held.insert(h.clone(), c);
                            backoff.remove(h);
                        }
                        Err(e) => {
                            let wait = backoff.get(h).map_or(Duration::from_secs(5), |d| {
                                (*d * 2).min(Duration::from_secs(600))
                            });
                            backoff.insert(h.clone(), wait);
                            tracing::warn!(host = %h, retry_in = ?wait, "ACME issuance failed (the current certificate, if any, stays): {e:#}");
                            next = next.min(now + wait);
                            continue;
                        }
                    }
                }
                if let Some(c) = held.get(h) {
                    next = next.min(c.renew_at());
                }
            }
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .max(Duration::from_millis(200));
            tokio::time::sleep(wait).await;
        }
    }
}

/// A certificate chain and key as rustls serves them, with the leaf's validity.
fn held(chain_pem: &str, key_pem: &str) -> anyhow::Result<Held> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("the certificate chain is not PEM")?;
    let leaf = chain.first().context("the certificate chain is empty")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| anyhow::anyhow!("the leaf certificate does not parse: {e}"))?;
    let to_time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let not_before = to_time(cert.validity().not_before);
    let not_after = to_time(cert.validity().not_after);
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("the key is not PEM")?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .context("the certificate's key type is not supported")?;
    Ok(Held {
        key: Arc::new(CertifiedKey::new(chain, signer)),
        not_before,
        not_after,
    })
}

/// A DNS name to put in a certificate and a file name: labels of letters, digits, `-`.
fn validate_hostname(host: &str) -> anyhow::Result<()> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !ok {
        bail!("`{host}` is not a DNS name ACME can issue for");
    }
    Ok(())
}

/// Writes `bytes` to `path` (parents 0700) as 0600, atomically (temp file, rename).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().context("a cache path has a directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pending_tokens_under_the_challenge_path_are_answered() {
        let c = Challenges::default();
        c.insert("tok1", "tok1.thumb");
        assert_eq!(
            c.answer("/.well-known/acme-challenge/tok1").as_deref(),
            Some("tok1.thumb")
        );
        assert_eq!(c.answer("/.well-known/acme-challenge/other"), None);
        assert_eq!(c.answer("/tok1"), None);
        c.remove("tok1");
        assert_eq!(c.answer("/.well-known/acme-challenge/tok1"), None);
    }

    #[test]
    fn hostnames_are_checked_before_they_become_file_names() {
        assert!(validate_hostname("gw.example.com").is_ok());
        for bad in ["", "../x", "a..b", "-a.b", "a/b", "*.example.com"] {
            assert!(validate_hostname(bad).is_err(), "{bad}");
        }
    }
}
