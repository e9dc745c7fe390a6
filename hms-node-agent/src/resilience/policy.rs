//! Access policy: who is calling, and may they call this service. Owns the mapping from a
//! caller's cgroup to a service identity ([`CallerIndex`]) and the allow/deny decision
//! ([`allows`]); never reads `/proc` or the cgroup tree on the data path (the index is built
//! when specs are deployed) and never answers the caller (the proxy sends the 403).
//!
//! 1. The eBPF connect hook records the caller's cgroup id (`bpf_get_current_cgroup_id`, the
//!    inode number of its cgroup v2 directory).
//! 2. [`CallerIndex`] maps that id to the service whose spec names that cgroup (`cgroup:`
//!    a path relative to the cgroup v2 root, an absolute path, or a systemd unit such as
//!    `payments.service`). An id no spec names is the host itself: [`Caller::Host`].
//! 3. Descendant cgroups: a process in a child of a service's cgroup (systemd puts workers
//!    in sub-cgroups; `hms-ctl run` may too) has a different id. The id lookup is exact, so
//!    when it says `Host` and the proxy knows the caller's pid, it reads
//!    `/proc/<pid>/cgroup` ([`crate::cgroup::cgroup_of_pid`]) and asks
//!    [`CallerIndex::caller_in_dir`], which walks up to the nearest service directory.
//! 4. [`allows`]: `allow_from_any` → everyone (services and the host); `deny_all` → nobody;
//!    `allow_from: [..]` → only the listed services — the host is not a listed service, so
//!    it is refused too.
//!
//! Hot path: one hash lookup; the caller's name is shared (`Arc<str>`), not copied.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hms_ctl::spec::{Policy, ServiceSpec};

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A process in the cgroup of this service (by name).
    Service(Arc<str>),
    /// A process in no service's cgroup.
    Host,
}

impl Caller {
    pub fn service(name: &str) -> Caller {
        Caller::Service(Arc::from(name))
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Service(name) => f.write_str(name),
            Caller::Host => f.write_str("host"),
        }
    }
}

/// Step 4: may `caller` call a service with `policy`?
pub fn allows(policy: &Policy, caller: &Caller) -> bool {
    match (policy, caller) {
        (Policy::AllowFromAny, _) => true,
        (Policy::DenyAll, _) => false,
        (Policy::AllowFrom(names), Caller::Service(name)) => {
            names.iter().any(|n| n.as_str() == &**name)
        }
        (Policy::AllowFrom(_), Caller::Host) => false,
    }
}

/// A spec's cgroup that could not be indexed (e.g. its directory does not exist yet): its
/// callers are treated as the host until it is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnindexedCgroup {
    pub service: String,
    pub dir: PathBuf,
    pub reason: String,
}

impl fmt::Display for UnindexedCgroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service {}: cgroup {} is not usable ({}); its callers count as the host until it \
             exists and the service is redeployed",
            self.service,
            self.dir.display(),
            self.reason
        )
    }
}

/// Steps 2 and 3: cgroup → service, built from the deployed specs.
#[derive(Debug, Default, Clone)]
pub struct CallerIndex {
    by_id: HashMap<u64, Arc<str>>,
    by_dir: HashMap<PathBuf, Arc<str>>,
}

impl CallerIndex {
    /// Indexes every spec that names a cgroup, resolving paths under `cgroup_root` (the
    /// cgroup v2 mount). Specs whose cgroup cannot be read are reported, not fatal; if two
    /// specs name one cgroup, the first keeps it and the second is reported.
    pub fn from_specs<'a>(
        specs: impl IntoIterator<Item = &'a ServiceSpec>,
        cgroup_root: &Path,
    ) -> (CallerIndex, Vec<UnindexedCgroup>) {
        let mut index = CallerIndex::default();
        let mut problems = Vec::new();
        for spec in specs {
            let Some(cgroup) = spec.cgroup.as_deref() else {
                continue;
            };
            let dir = service_cgroup_dir(cgroup_root, cgroup);
            let problem = |reason: String| UnindexedCgroup {
                service: spec.name.clone(),
                dir: dir.clone(),
                reason,
            };
            match crate::cgroup::cgroup_id(&dir) {
                Err(e) => problems.push(problem(format!("{e:#}"))),
                Ok(id) => match index.by_id.get(&id) {
                    Some(owner) => {
                        problems.push(problem(format!("already the cgroup of service {owner}")))
                    }
                    None => index.insert(id, dir.clone(), &spec.name),
                },
            }
        }
        (index, problems)
    }

    /// Records that cgroup `id` (directory `dir`) is service `name`.
    pub fn insert(&mut self, id: u64, dir: PathBuf, name: &str) {
        let name: Arc<str> = Arc::from(name);
        self.by_id.insert(id, name.clone());
        self.by_dir.insert(dir, name);
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The caller whose cgroup id the eBPF hook recorded: exact match only.
    pub fn caller_by_cgroup_id(&self, id: u64) -> Caller {
        match self.by_id.get(&id) {
            Some(name) => Caller::Service(name.clone()),
            None => Caller::Host,
        }
    }

    /// The caller running in cgroup directory `dir` (as [`crate::cgroup::cgroup_of_pid`]
    /// returns it): the service of `dir` or of its nearest ancestor.
    pub fn caller_in_dir(&self, dir: &Path) -> Caller {
        dir.ancestors()
            .find_map(|d| self.by_dir.get(d))
            .map_or(Caller::Host, |name| Caller::Service(name.clone()))
    }
}

/// Where a spec's `cgroup:` lives: an absolute path as is; a bare systemd unit
/// (`payments.service`, `.scope`) under `system.slice`; a bare slice (`a-b.slice`) at its
/// nested place (`a.slice/a-b.slice`); anything else relative to `cgroup_root`.
pub fn service_cgroup_dir(cgroup_root: &Path, cgroup: &str) -> PathBuf {
    let cgroup = cgroup.trim();
    if cgroup.starts_with('/') {
        return PathBuf::from(cgroup);
    }
    if !cgroup.contains('/') {
        if cgroup.ends_with(".service") || cgroup.ends_with(".scope") {
            return cgroup_root.join("system.slice").join(cgroup);
        }
        if let Some(stem) = cgroup.strip_suffix(".slice") {
            // systemd nests slices by dashes: a-b.slice lives in a.slice/a-b.slice.
            let mut dir = cgroup_root.to_path_buf();
            let mut prefix = String::new();
            for part in stem.split('-') {
                if !prefix.is_empty() {
                    prefix.push('-');
                }
                prefix.push_str(part);
                dir.push(format!("{prefix}.slice"));
            }
            return dir;
        }
    }
    cgroup_root.join(cgroup)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, cgroup: Option<&str>) -> ServiceSpec {
        let yaml = match cgroup {
            Some(c) => format!("name: {name}\nport: 7000\ncgroup: {c}\n"),
            None => format!("name: {name}\nport: 7000\n"),
        };
        hms_ctl::spec::parse(&yaml, "test.yaml").expect("valid spec")
    }

    #[test]
    fn allow_from_any_lets_every_service_and_the_host_in() {
        let p = Policy::AllowFromAny;
        assert!(allows(&p, &Caller::service("payments-svc")));
        assert!(allows(&p, &Caller::Host));
    }

    #[test]
    fn deny_all_keeps_everyone_out() {
        let p = Policy::DenyAll;
        assert!(!allows(&p, &Caller::service("payments-svc")));
        assert!(!allows(&p, &Caller::Host));
    }

    #[test]
    fn allow_from_lets_only_the_listed_services_in_and_not_the_host() {
        let p = Policy::AllowFrom(vec!["payments-svc".into(), "identity-svc".into()]);
        assert!(allows(&p, &Caller::service("payments-svc")));
        assert!(allows(&p, &Caller::service("identity-svc")));
        assert!(!allows(&p, &Caller::service("billing-svc")));
        assert!(
            !allows(&p, &Caller::service("payments")),
            "no prefix matching"
        );
        assert!(!allows(&p, &Caller::Host));
        assert!(!allows(
            &Policy::AllowFrom(vec![]),
            &Caller::service("payments-svc")
        ));
    }

    #[test]
    fn a_process_in_a_service_cgroup_is_that_service_and_others_are_the_host() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("hms/payments")).unwrap();
        std::fs::create_dir_all(root.path().join("hms/identity")).unwrap();
        let identity_abs = root.path().join("hms/identity");
        let specs = [
            spec("payments-svc", Some("hms/payments")),
            spec("identity-svc", Some(identity_abs.to_str().unwrap())),
            spec("billing-svc", None),
        ];
        let (index, problems) = CallerIndex::from_specs(&specs, root.path());
        assert_eq!(problems, []);
        assert_eq!(index.len(), 2);

        let id = |p: &str| crate::cgroup::cgroup_id(&root.path().join(p)).unwrap();
        assert_eq!(
            index.caller_by_cgroup_id(id("hms/payments")),
            Caller::service("payments-svc")
        );
        assert_eq!(
            index.caller_by_cgroup_id(id("hms/identity")),
            Caller::service("identity-svc")
        );
        assert_eq!(index.caller_by_cgroup_id(id("hms")), Caller::Host);
        assert_eq!(index.caller_by_cgroup_id(id("")), Caller::Host);
    }

    #[test]
    fn a_process_in_a_child_cgroup_is_found_by_walking_up_its_directory() {
        let root = tempfile::tempdir().unwrap();
        let worker = root.path().join("hms/payments/worker-1");
        std::fs::create_dir_all(&worker).unwrap();
        let (index, _) =
            CallerIndex::from_specs(&[spec("payments-svc", Some("hms/payments"))], root.path());

        let worker_id = crate::cgroup::cgroup_id(&worker).unwrap();
        assert_eq!(
            index.caller_by_cgroup_id(worker_id),
            Caller::Host,
            "ids match exactly"
        );
        assert_eq!(
            index.caller_in_dir(&worker),
            Caller::service("payments-svc")
        );
        assert_eq!(index.caller_in_dir(&root.path().join("hms")), Caller::Host);
        assert_eq!(
            index.caller_in_dir(&root.path().join("hms/payments-2")),
            Caller::Host
        );
    }

    #[test]
    fn a_missing_or_shared_cgroup_is_reported_and_its_callers_count_as_the_host() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("shared")).unwrap();
        let specs = [
            spec("ghost-svc", Some("not-created-yet")),
            spec("first-svc", Some("shared")),
            spec("second-svc", Some("shared")),
        ];
        let (index, problems) = CallerIndex::from_specs(&specs, root.path());
        let named: Vec<&str> = problems.iter().map(|p| p.service.as_str()).collect();
        assert_eq!(named, ["ghost-svc", "second-svc"]);
        assert!(
            problems[0].to_string().contains("not-created-yet"),
            "{}",
            problems[0]
        );
        assert!(problems[1].reason.contains("first-svc"));
        let shared = crate::cgroup::cgroup_id(&root.path().join("shared")).unwrap();
        assert_eq!(
            index.caller_by_cgroup_id(shared),
            Caller::service("first-svc")
        );
    }

    #[test]
    fn spec_cgroups_resolve_paths_units_and_slices_like_systemd() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            service_cgroup_dir(root, "hms/payments"),
            root.join("hms/payments")
        );
        assert_eq!(
            service_cgroup_dir(root, "/sys/fs/cgroup/unified/x"),
            PathBuf::from("/sys/fs/cgroup/unified/x")
        );
        assert_eq!(
            service_cgroup_dir(root, "payments.service"),
            root.join("system.slice/payments.service")
        );
        assert_eq!(
            service_cgroup_dir(root, "hms.slice"),
            root.join("hms.slice")
        );
        assert_eq!(
            service_cgroup_dir(root, "hms-payments.slice"),
            root.join("hms.slice/hms-payments.slice")
        );
        assert_eq!(service_cgroup_dir(root, "plain"), root.join("plain"));
    }

    #[test]
    fn callers_print_as_their_service_or_host() {
        assert_eq!(Caller::service("payments-svc").to_string(), "payments-svc");
        assert_eq!(Caller::Host.to_string(), "host");
    }
}
