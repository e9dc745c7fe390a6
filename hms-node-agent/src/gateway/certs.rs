//! The certificates of one https listener, chosen by SNI. Owns loading PEM files, watching
//! them and the name -> key map rustls asks per handshake; never reads a file on the
//! handshake path (the map is swapped whole, readers take an `Arc`).
//!
//! 1. Each `certificates:` entry is a source: a chain file and a key file. Its names are the
//!    leaf's DNS subject alternative names (`*.example` ones match one more label).
//! 2. [`CertStore::reload_changed`] (every second from the listener's watcher) stats both
//!    files; when either changed (size, mtime, inode) it loads the pair. A pair that does not
//!    load — garbage, a key that does not match, a half-written file — keeps the last good
//!    key, is logged and counted, and shows in `hms-ctl gateway describe`; it is tried again
//!    when the files change again. Connections already open keep their session; new
//!    handshakes get the new key at once.
//! 3. [`CertStore::insert`] puts a key for a name at runtime (ACME hands its certificates
//!    over this way); such keys win over file keys of the same name.
//! 4. A handshake with an SNI no key covers fails (rustls answers with an alert); without
//!    SNI the first source's key is used.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, bail};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use hms_ctl::gateway::CertificateFiles;

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
    })
}

/// One loaded certificate: its key, names and expiry.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    pub not_after_unix: i64,
}

struct Source {
    files: CertificateFiles,
    seen: Option<(Stamp, Stamp)>,
    good: Option<Loaded>,
    /// The last load's failure, until a load succeeds.
    problem: Option<String>,
}

/// A certificate's state for `describe`.
#[derive(Debug, Clone)]
pub struct CertState {
    pub file: String,
    pub names: Vec<String>,
    pub not_after_unix: Option<i64>,
    pub problem: Option<String>,
}

#[derive(Default)]
struct Map {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `example.com` for `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

pub struct CertStore {
    sources: Mutex<Vec<Source>>,
    runtime: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    map: RwLock<Arc<Map>>,
    /// Called with the file and the error when a reload fails (metrics).
    on_failure: Box<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

impl CertStore {
    /// Loads every source once. A source that does not load at start is an error for the
    /// listener (there is no last good key to keep yet); the message names the file.
    pub fn load(
        files: &[CertificateFiles],
        on_failure: Box<dyn Fn(&str) + Send + Sync>,
    ) -> anyhow::Result<CertStore> {
        let mut sources = Vec::new();
        for f in files {
            let seen = stamp(Path::new(&f.cert)).zip(stamp(Path::new(&f.key)));
            let good = load_pair(&f.cert, &f.key)?;
            sources.push(Source {
                files: f.clone(),
                seen,
                good: Some(good),
                problem: None,
            });
        }
        let store = CertStore {
            sources: Mutex::new(sources),
            runtime: Mutex::new(HashMap::new()),
            map: RwLock::new(Arc::new(Map::default())),
            on_failure,
        };
        store.rebuild();
        Ok(store)
    }

    /// Step 2: reloads the sources whose files changed; true if any key changed.
    pub fn reload_changed(&self) -> bool {
        let mut changed = false;
        {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            for s in sources.iter_mut() {
                let now = stamp(Path::new(&s.files.cert)).zip(stamp(Path::new(&s.files.key)));
                if now == s.seen {
                    continue;
                }
                s.seen = now;
                match load_pair(&s.files.cert, &s.files.key) {
                    Ok(l) => {
                        tracing::info!(cert = %s.files.cert, names = ?l.names, "gateway certificate reloaded");
                        s.good = Some(l);
                        s.problem = None;
                        changed = true;
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        tracing::warn!(
                            cert = %s.files.cert, key = %s.files.key,
                            "gateway certificate did not reload; still serving the last good one: {msg}"
                        );
                        (self.on_failure)(&s.files.cert);
                        s.problem = Some(msg);
                    }
                }
            }
        }
        if changed {
            self.rebuild();
        }
        changed
    }

    /// Step 3: serve `key` for `name` from now on (ACME).
    pub fn insert(&self, name: &str, key: Arc<CertifiedKey>) {
        self.runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_ascii_lowercase(), key);
        self.rebuild();
    }

    pub fn states(&self) -> Vec<CertState> {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources
            .iter()
            .map(|s| CertState {
                file: s.files.cert.clone(),
                names: s.good.as_ref().map(|g| g.names.clone()).unwrap_or_default(),
                not_after_unix: s.good.as_ref().map(|g| g.not_after_unix),
                problem: s.problem.clone(),
            })
            .collect()
    }

    fn rebuild(&self) {
        let mut map = Map::default();
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        for s in sources.iter() {
            let Some(g) = &s.good else { continue };
            if map.default.is_none() {
                map.default = Some(g.key.clone());
            }
            for n in &g.names {
                let n = n.to_ascii_lowercase();
                match n.strip_prefix("*.") {
                    Some(base) => map.wildcard.entry(base.to_string()),
                    None => map.exact.entry(n),
                }
                .or_insert_with(|| g.key.clone());
            }
        }
        drop(sources);
        for (n, k) in self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            map.exact.insert(n.clone(), k.clone());
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    /// The key for a handshake's SNI (step 4).
    pub fn for_sni(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(name) = sni else {
            return map.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = map.exact.get(&name) {
            return Some(k.clone());
        }
        let (_, base) = name.split_once('.')?;
        map.wildcard.get(base).cloned()
    }
}

/// Resolves per handshake through the store (shared with the watcher).
#[derive(Debug)]
pub struct SniResolver(pub Arc<CertStore>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.0.for_sni(hello.server_name());
        if key.is_none() {
            tracing::info!(sni = ?hello.server_name(), "gateway TLS: no certificate for this name; handshake refused");
        }
        key
    }
}

/// Loads a chain and its key; the key must belong to the leaf.
pub fn load_pair(cert: &str, key: &str) -> anyhow::Result<Loaded> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate file {cert}"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{cert} is not a PEM certificate chain"))?;
    if chain.is_empty() {
        bail!("{cert} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)");
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{key} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&private)
        .with_context(|| format!("{key}: unsupported key type"))?;
    let (names, not_after_unix) = leaf_names(&chain[0]).with_context(|| format!("{cert}: leaf"))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| anyhow::anyhow!("{key} is not the key of {cert}: {e}"))?;
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        not_after_unix,
    })
}

/// The DNS names (SAN, else CN) and expiry of a certificate.
fn leaf_names(der: &CertificateDer<'_>) -> anyhow::Result<(Vec<String>, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    if names.is_empty()
        && let Some(cn) = cert.subject().iter_common_name().next()
        && let Ok(cn) = cn.as_str()
    {
        names.push(cn.to_string());
    }
    Ok((names, cert.validity().not_after.timestamp()))
}
