//! The etcd registry against a real etcd: several hosts (stores with their own node names)
//! share one registry. Each test starts its own etcd on random loopback ports with a
//! temporary data directory. No kernel features are needed; these run unprivileged too.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hms_node_agent::config::Ipv4Cidr;
use hms_node_agent::registry::{
    EtcdOptions, EtcdStore, NodeInfo, ServiceSpec, Snapshot, Store, parse_spec, vip,
};
use vm_tests::etcd::Etcd;
use vm_tests::slack;

fn spec(name: &str, port: u16) -> ServiceSpec {
    parse_spec(&format!("name: {name}\nport: {port}\n"), "test.yaml").unwrap()
}

fn range() -> Ipv4Cidr {
    "127.77.0.0/16".parse().unwrap()
}

async fn host(etcd: &Etcd, node: &str, tweak: impl FnOnce(&mut EtcdOptions)) -> Arc<EtcdStore> {
    let mut opts = EtcdOptions::new(vec![etcd.endpoint()], node, range());
    tweak(&mut opts);
    Arc::new(
        EtcdStore::connect(opts)
            .await
            .unwrap_or_else(|e| panic!("{node} connecting: {e:#}\netcd log:\n{}", etcd.log())),
    )
}

/// Store writes block (the admin API makes them from spawn_blocking); so do the tests.
async fn blocking<T: Send + 'static>(
    store: &Arc<EtcdStore>,
    f: impl FnOnce(&EtcdStore) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .unwrap()
}

/// Polls `store`'s snapshot until `ok` holds; how long it took, or a panic naming `what`.
async fn eventually(
    store: &Arc<EtcdStore>,
    within: Duration,
    what: &str,
    ok: impl Fn(&Snapshot) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if ok(&store.snapshot()) {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!(
                "{what}: not seen within {within:?}; health {:?}; snapshot {:?}",
                store.health(),
                store.snapshot()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn nodes_of(snap: &Snapshot, service: &str) -> Vec<String> {
    snap.service(service)
        .map(|s| s.instances.iter().map(|i| i.node.clone()).collect())
        .unwrap_or_default()
}

fn node_info(name: &str, port: u16) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        inbound: format!("127.0.0.1:{port}").parse().unwrap(),
        last_seen_unix_ms: 1,
        cert_expiry_unix_ms: Some(2),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_on_one_host_is_served_on_every_host_with_both_hosts_instances() {
    let etcd = Etcd::start().unwrap();
    let a = host(&etcd, "host-a", |_| {}).await;
    let b = host(&etcd, "host-b", |_| {}).await;

    let deployed = blocking(&a, |s| s.deploy(spec("payments-svc", 7000), "host-a"))
        .await
        .unwrap();
    assert!(!deployed.replaced);
    assert!(range().contains(deployed.service.vip));
    // A reads its own write at once; B within a second.
    assert_eq!(nodes_of(&a.snapshot(), "payments-svc"), ["host-a"]);
    let took = eventually(&b, slack(Duration::from_secs(1)), "A's deploy on B", |s| {
        s.by_vip(deployed.service.vip)
            .is_some_and(|svc| svc.spec.name == "payments-svc")
    })
    .await;
    eprintln!("a deploy on host-a reached host-b in {took:?}");

    // B runs the same service too: one VIP, instances from both hosts, on both hosts.
    let again = blocking(&b, |s| s.deploy(spec("payments-svc", 7000), "host-b"))
        .await
        .unwrap();
    assert!(again.replaced);
    assert_eq!(again.service.vip, deployed.service.vip);
    for store in [&a, &b] {
        eventually(
            store,
            slack(Duration::from_secs(1)),
            "both instances",
            |s| nodes_of(s, "payments-svc") == ["host-a", "host-b"],
        )
        .await;
    }

    // Node records and blobs are shared the same way.
    blocking(&a, |s| s.register_node(node_info("host-a", 15008)))
        .await
        .unwrap();
    blocking(&b, |s| s.register_node(node_info("host-b", 15009)))
        .await
        .unwrap();
    eventually(&a, slack(Duration::from_secs(1)), "both nodes", |s| {
        s.nodes().count() == 2 && s.node("host-b").is_some_and(|n| n.inbound.port() == 15009)
    })
    .await;
    assert!(
        blocking(&a, |s| s.create_blob("ca/root.pem", b"A's CA"))
            .await
            .unwrap()
    );
    assert!(
        !blocking(&b, |s| s.create_blob("ca/root.pem", b"B's CA"))
            .await
            .unwrap(),
        "the second host must not replace the first host's CA"
    );
    assert_eq!(
        blocking(&b, |s| s.get_blob("ca/root.pem")).await.unwrap(),
        Some(b"A's CA".to_vec())
    );
    eventually(&b, slack(Duration::from_secs(1)), "the CA blob", |s| {
        s.blob("ca/root.pem").is_some_and(|v| &**v == b"A's CA")
    })
    .await;
    assert!(
        blocking(&a, |s| s.put_blob("../escape", b"x"))
            .await
            .is_err()
    );

    // A route/limit change on B reaches A; an undeploy on B removes it everywhere.
    blocking(&b, |s| {
        s.update_spec("payments-svc", &mut |sp| {
            sp.limit = Some(
                hms_node_agent::registry::parse_spec("name: x\nport: 1\nlimit: 50rps\n", "t")?
                    .limit
                    .unwrap(),
            );
            Ok(())
        })
    })
    .await
    .unwrap();
    eventually(&a, slack(Duration::from_secs(1)), "B's limit on A", |s| {
        s.service("payments-svc")
            .and_then(|svc| svc.spec.limit)
            .is_some_and(|l| l.requests == 50)
    })
    .await;
    assert!(blocking(&b, |s| s.undeploy("payments-svc")).await.unwrap());
    assert!(b.snapshot().service("payments-svc").is_none());
    eventually(
        &a,
        slack(Duration::from_secs(1)),
        "the undeploy on A",
        |s| s.service("payments-svc").is_none(),
    )
    .await;
    assert!(!blocking(&a, |s| s.undeploy("payments-svc")).await.unwrap());
    let health = a.health();
    assert!(health.connected && health.backend == "etcd" && health.revision > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_instances_vanish_when_its_lease_runs_out() {
    let etcd = Etcd::start().unwrap();
    let ttl = Duration::from_secs(2);
    let a = host(&etcd, "host-a", |o| o.lease_ttl = ttl).await;
    let b = host(&etcd, "host-b", |o| o.lease_ttl = ttl).await;
    blocking(&a, |s| s.deploy(spec("orders-svc", 7100), "host-a"))
        .await
        .unwrap();
    blocking(&a, |s| s.register_node(node_info("host-a", 15008)))
        .await
        .unwrap();
    blocking(&b, |s| s.deploy(spec("orders-svc", 7100), "host-b"))
        .await
        .unwrap();
    eventually(&b, slack(Duration::from_secs(1)), "both instances", |s| {
        nodes_of(s, "orders-svc") == ["host-a", "host-b"]
    })
    .await;
    // Outlives several renewals: a live host's instances stay.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(nodes_of(&b.snapshot(), "orders-svc"), ["host-a", "host-b"]);

    // host-a dies: no cleanup, its keep-alives just stop.
    drop(a);
    let died = Instant::now();
    let gone = eventually(
        &b,
        slack(ttl + Duration::from_secs(3)),
        "host-a expiring",
        |s| nodes_of(s, "orders-svc") == ["host-b"] && s.node("host-a").is_none(),
    )
    .await;
    eprintln!("host-a's instances vanished {gone:?} after it died (TTL {ttl:?})");
    assert!(
        died.elapsed() >= ttl / 2,
        "host-a's keys went too early: they must outlive the host by its lease"
    );
    // The service itself is global and stays.
    assert!(b.snapshot().service("orders-svc").is_some());

    // A clean stop withdraws at once.
    let c = host(&etcd, "host-c", |o| o.lease_ttl = Duration::from_secs(30)).await;
    blocking(&c, |s| s.deploy(spec("orders-svc", 7100), "host-c"))
        .await
        .unwrap();
    eventually(&b, slack(Duration::from_secs(1)), "host-c", |s| {
        nodes_of(s, "orders-svc").contains(&"host-c".to_string())
    })
    .await;
    blocking(&c, |s| s.leave()).await.unwrap();
    eventually(&b, slack(Duration::from_secs(1)), "host-c leaving", |s| {
        nodes_of(s, "orders-svc") == ["host-b"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_serves_its_last_state_through_an_etcd_outage_and_misses_no_change() {
    let mut etcd = Etcd::start().unwrap();
    let a = host(&etcd, "host-a", |_| {}).await;
    let b = host(&etcd, "host-b", |_| {}).await;
    blocking(&a, |s| s.deploy(spec("kept-svc", 7200), "host-a"))
        .await
        .unwrap();
    blocking(&a, |s| s.deploy(spec("doomed-svc", 7201), "host-a"))
        .await
        .unwrap();
    eventually(
        &b,
        slack(Duration::from_secs(1)),
        "both services on B",
        |s| s.len() == 2,
    )
    .await;

    etcd.stop();
    let served = a.snapshot();
    // The data path keeps getting the last state at once, and health says why it is stale.
    let start = Instant::now();
    for _ in 0..1000 {
        assert_eq!(a.snapshot().len(), 2);
    }
    assert!(start.elapsed() < Duration::from_millis(200));
    eventually(
        &a,
        slack(Duration::from_secs(5)),
        "A noticing the outage",
        |_| !a.health().connected,
    )
    .await;
    assert!(a.health().last_error.is_some());
    assert!(
        blocking(&a, |s| s.deploy(spec("new-svc", 7202), "host-a"))
            .await
            .is_err(),
        "a write with etcd down must fail, not hang or pretend"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.snapshot().len(), served.len());

    // etcd comes back; B writes at once, before A's watch is back: A resumes from its
    // revision and sees every change.
    etcd.resume().unwrap();
    let wrote = Instant::now();
    let mut written = false;
    while !written {
        match blocking(&b, |s| s.deploy(spec("late-svc", 7203), "host-b")).await {
            Ok(_) => written = true,
            Err(e) if wrote.elapsed() < slack(Duration::from_secs(10)) => {
                eprintln!("B's write after the restart: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("B could not write after etcd came back: {e:#}"),
        }
    }
    blocking(&b, |s| s.undeploy("doomed-svc")).await.unwrap();
    blocking(&b, |s| {
        s.update_spec("kept-svc", &mut |sp| {
            sp.port = 7299;
            Ok(())
        })
    })
    .await
    .unwrap();
    let after_write = Instant::now();
    let took = eventually(&a, slack(Duration::from_secs(3)), "B's changes on A", |s| {
        s.service("late-svc").is_some()
            && s.service("doomed-svc").is_none()
            && s.service("kept-svc").is_some_and(|k| k.spec.port == 7299)
    })
    .await;
    eprintln!(
        "A caught up {took:?} after B's last write ({:?} after etcd came back)",
        after_write.duration_since(wrote) + took
    );
    eventually(&a, slack(Duration::from_secs(3)), "A reconnected", |_| {
        a.health().connected
    })
    .await;
    // A's own instance survived the outage (its lease outlived it, or was renewed).
    eventually(&b, slack(Duration::from_secs(3)), "A's instance", |s| {
        nodes_of(s, "kept-svc") == ["host-a"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_deploying_colliding_names_at_once_never_share_a_vip() {
    let etcd = Etcd::start().unwrap();
    // Six usable addresses: collisions are certain.
    let small: Ipv4Cidr = "127.78.0.0/29".parse().unwrap();
    let a = host(&etcd, "host-a", |o| o.vip_range = small).await;
    let b = host(&etcd, "host-b", |o| o.vip_range = small).await;

    // Pairs of different names whose hash picks the same first VIP.
    let first = |n: &str| vip::allocate(small, n, &HashSet::new()).unwrap();
    let mut pairs = Vec::new();
    let mut i = 0;
    while pairs.len() < 3 {
        let (x, y) = (format!("a{i}-svc"), format!("b{i}-svc"));
        let y = (0..100)
            .map(|j| format!("{y}{j}"))
            .find(|y| first(y) == first(&x))
            .unwrap_or(y);
        if first(&x) == first(&y) {
            pairs.push((x, y));
        }
        i += 1;
    }
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let run = |store: &Arc<EtcdStore>, node: &'static str, names: Vec<String>| {
        let store = store.clone();
        let barrier = barrier.clone();
        tokio::task::spawn_blocking(move || {
            barrier.wait();
            names
                .into_iter()
                .map(|n| store.deploy(spec(&n, 7000), node).unwrap().service.vip)
                .collect::<Vec<Ipv4Addr>>()
        })
    };
    let (xs, ys): (Vec<String>, Vec<String>) = pairs.into_iter().unzip();
    let (va, vb) = tokio::join!(run(&a, "host-a", xs), run(&b, "host-b", ys));
    let all: Vec<Ipv4Addr> = va.unwrap().into_iter().chain(vb.unwrap()).collect();
    let distinct: HashSet<Ipv4Addr> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "a VIP was handed out twice: {all:?}"
    );
    assert!(all.iter().all(|v| small.contains(*v)));
    for store in [&a, &b] {
        eventually(store, slack(Duration::from_secs(1)), "all six", |s| {
            s.len() == 6 && all.iter().all(|v| s.by_vip(*v).is_some())
        })
        .await;
    }
    // The range is full now: a seventh name gets a clear error, not a shared VIP.
    let err = blocking(&a, |s| s.deploy(spec("seventh-svc", 7000), "host-a"))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("no free VIP"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_host_catches_up_from_its_revision_or_relists_after_compaction() {
    use vm_tests::etcd::{Partition, etcdctl};
    let etcd = Etcd::start().unwrap();
    let link = Partition::new(&etcd).unwrap();
    // A reaches etcd only through the relay; its lease outlives the partitions.
    let a = Arc::new(
        EtcdStore::connect({
            let mut o = EtcdOptions::new(vec![link.endpoint()], "host-a", range());
            o.lease_ttl = Duration::from_secs(30);
            o
        })
        .await
        .unwrap(),
    );
    let b = host(&etcd, "host-b", |_| {}).await;
    for (name, port) in [("one-svc", 7300), ("two-svc", 7301), ("three-svc", 7302)] {
        blocking(&b, move |s| s.deploy(spec(name, port), "host-b"))
            .await
            .unwrap();
    }
    eventually(
        &a,
        slack(Duration::from_secs(1)),
        "B's services on A",
        |s| s.len() == 3,
    )
    .await;

    // 1. Partition A; B changes things; A keeps serving what it had, then resumes its watch
    //    from its revision and gets every change.
    link.cut();
    eventually(
        &a,
        slack(Duration::from_secs(5)),
        "A noticing the cut",
        |_| !a.health().connected,
    )
    .await;
    blocking(&b, |s| s.undeploy("one-svc")).await.unwrap();
    blocking(&b, |s| s.deploy(spec("four-svc", 7303), "host-b"))
        .await
        .unwrap();
    blocking(&b, |s| {
        s.update_spec("two-svc", &mut |sp| {
            sp.port = 7391;
            Ok(())
        })
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        a.snapshot().service("one-svc").is_some(),
        "A serves its last state while cut off"
    );
    link.heal();
    let took = eventually(
        &a,
        slack(Duration::from_secs(3)),
        "every change on A",
        |s| {
            s.service("one-svc").is_none()
                && s.service("four-svc").is_some()
                && s.service("two-svc").is_some_and(|t| t.spec.port == 7391)
        },
    )
    .await;
    eprintln!("A caught up {took:?} after the partition healed");

    // 2. Partition again; B changes things and etcd compacts its history past A's revision:
    //    A must re-list instead of resuming, and still end up with exactly B's state.
    link.cut();
    eventually(
        &a,
        slack(Duration::from_secs(5)),
        "A noticing the cut",
        |_| !a.health().connected,
    )
    .await;
    blocking(&b, |s| s.undeploy("three-svc")).await.unwrap();
    blocking(&b, |s| s.deploy(spec("five-svc", 7304), "host-b"))
        .await
        .unwrap();
    let rev = b.health().revision;
    etcdctl(&etcd, &["compact", &rev.to_string(), "--physical"]).unwrap();
    link.heal();
    eventually(&a, slack(Duration::from_secs(3)), "B's state on A", |s| {
        let names: Vec<&str> = s.services().map(|x| x.spec.name.as_str()).collect();
        names == ["five-svc", "four-svc", "two-svc"]
    })
    .await;
    eventually(&a, slack(Duration::from_secs(3)), "A reconnected", |_| {
        a.health().connected
    })
    .await;
    assert!(a.health().revision >= rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_its_instances() {
    let etcd = Etcd::start().unwrap();
    let ttl = Duration::from_secs(2);
    let b = host(&etcd, "host-b", |_| {}).await;
    let a = host(&etcd, "host-a", |o| o.lease_ttl = ttl).await;
    blocking(&a, |s| s.deploy(spec("steady-svc", 7400), "host-a"))
        .await
        .unwrap();
    drop(a);
    let a = host(&etcd, "host-a", |o| o.lease_ttl = ttl).await;
    // Well past the old lease: the instance moved to the new one.
    tokio::time::sleep(ttl * 2 + Duration::from_secs(1)).await;
    assert_eq!(nodes_of(&b.snapshot(), "steady-svc"), ["host-a"]);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_larger_than_one_grpc_answer_is_listed_in_pages() {
    let etcd = Etcd::start().unwrap();
    let a = host(&etcd, "host-a", |_| {}).await;
    // 2,400 blobs of 2 KiB: ~5 MiB under the prefix, over the 4 MiB the gRPC client takes in
    // one answer (a 10,000-service registry is about that size).
    let value = Arc::new(vec![b'x'; 2048]);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (a, value) = (a.clone(), value.clone());
            tokio::task::spawn_blocking(move || {
                for i in (0..2400).filter(|i| i % 4 == w) {
                    a.put_blob(&format!("big/{i:04}"), &value).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for (name, port) in [("paged-svc", 7500), ("other-svc", 7501)] {
        blocking(&a, move |s| s.deploy(spec(name, port), "host-a"))
            .await
            .unwrap();
    }
    // A host joining now lists all of it (its first list, then the same list as a re-list).
    let b = host(&etcd, "host-b", |_| {}).await;
    let snap = b.snapshot();
    assert_eq!(snap.blobs_under("big/").count(), 2400);
    assert!(
        snap.blobs_under("big/")
            .all(|(_, v)| v.len() == 2048 && v.iter().all(|b| *b == b'x'))
    );
    let mine = a.snapshot();
    for name in ["paged-svc", "other-svc"] {
        assert_eq!(
            snap.service(name).map(|s| (s.vip, s.instances.len())),
            mine.service(name).map(|s| (s.vip, 1)),
            "{name} on the joining host"
        );
    }
}
