use super::units::*;
use super::*;

fn args(flags: &[&str]) -> RunArgs {
    #[derive(clap::Parser)]
    struct P {
        #[command(flatten)]
        run: RunArgs,
    }
    let mut argv = vec!["x"];
    argv.extend_from_slice(flags);
    <P as clap::Parser>::try_parse_from(argv).unwrap().run
}

#[test]
fn keys_cover_every_run_flag() {
    #[derive(clap::Parser)]
    struct P {
        #[command(flatten)]
        run: RunArgs,
    }
    let ids: Vec<String> = <P as clap::CommandFactory>::command()
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    assert!(ids.len() > 5, "{ids:?}");
    for id in ids {
        // `--config` is the file itself; `--takeover` is a one-shot of an upgrade.
        // The token file is read by install into `join-token` (0600 config).
        if id == "config" || id == "help" || id == "takeover" || id == "join_token_file" {
            continue;
        }
        let key = id.replace('_', "-");
        assert!(
            KEYS.iter().any(|k| k.name == key),
            "`run --{key}` is not persisted by install: add it to KEYS and yaml_value()"
        );
    }
}

#[test]
fn config_round_trips_the_flags() {
    let mut given = args(&[
        "--node-name",
        "host-a",
        "--cgroup",
        "/sys/fs/cgroup/my mesh",
        "--state-dir",
        "/srv/hms-state",
        "--vip-cidr",
        "127.88.0.0/20",
        "--outbound",
        "127.0.0.1:25001",
        "--dns",
        "127.0.0.2:25053",
        "--inbound",
        "[::]:25008",
        "--metrics",
        "127.0.0.1:25090",
        "--registry",
        "etcd://10.0.0.1:2379,10.0.0.2:2379",
        "--dns-mark",
        "0x1234",
        "--log-format",
        "json",
        "--pin-dir",
        "/sys/fs/bpf/it's",
        "--admin-socket",
        "/run/x/a.sock",
        "--trust-domain",
        "mesh.example",
        "--sk-msg-bypass=false",
        "--dns-allow-remote",
        "--advertise",
        "10.0.0.7:25008",
        "--ipv6=false",
        "--vip6-prefix",
        "fd00:1234::/96",
        "--egress-resolver",
        "127.0.0.53:53",
        "--refuse-undeclared-egress",
        "--gateway",
        "public,admin",
    ]);
    // Only from a file (install reads --join-token-file into it).
    given.join_token = Some("hms2.abc".into());
    let text = render_config(&given);
    let back = parse_config(&text, Path::new("t")).unwrap();
    for key in KEYS {
        assert_eq!(
            yaml_value(&back, key.name),
            yaml_value(&given, key.name),
            "{}\n{text}",
            key.name
        );
        assert!(yaml_value(&given, key.name).is_some(), "{} set", key.name);
    }
    assert_eq!(back.dns_mark, Some(0x1234));
    assert_eq!(back.inbound, Some("[::]:25008".parse().unwrap()));
    assert_eq!(back.sk_msg_bypass, Some(false));
    assert_eq!(back.refuse_undeclared_egress, Some(true));
    assert_eq!(back.ipv6, Some(false));
    assert_eq!(back.vip6_prefix, Some("fd00:1234::/96".parse().unwrap()));
}

#[test]
fn unset_settings_are_commented_defaults() {
    let text = render_config(&args(&["--node-name", "n1"]));
    assert!(text.contains("\nnode-name: 'n1'\n"), "{text}");
    assert!(text.contains("\n# outbound: 127.0.0.1:15001\n"), "{text}");
    let back = parse_config(&text, Path::new("t")).unwrap();
    assert_eq!(back.node_name.as_deref(), Some("n1"));
    assert!(back.outbound.is_none() && back.dns_mark.is_none());
    // Every documented default is what the agent uses.
    let defaults = KEYS
        .iter()
        .filter(|k| !k.default.contains(' '))
        .map(|k| format!("{}: {}\n", k.name, k.default))
        .collect::<String>();
    let parsed = parse_config(&defaults, Path::new("defaults")).unwrap();
    let mut with_cgroup = parsed.clone();
    with_cgroup.cgroup = Some("/".into());
    let c = AgentConfig::resolve(with_cgroup).unwrap();
    let d = AgentConfig::resolve(RunArgs {
        cgroup: Some("/".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        (c.outbound, c.dns, c.inbound, c.metrics, c.dns_mark),
        (d.outbound, d.dns, d.inbound, d.metrics, d.dns_mark)
    );
    assert_eq!((c.vip_cidr, c.registry), (d.vip_cidr, d.registry));
    assert_eq!(
        (c.state_dir, c.admin_socket, c.pin_dir, c.log_format),
        (d.state_dir, d.admin_socket, d.pin_dir, d.log_format)
    );
}

#[test]
fn the_agent_reads_what_install_writes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.yaml");
    for flags in [
        &[][..],
        &[
            "--node-name",
            "n2",
            "--dns-mark",
            "0x99",
            "--inbound",
            "[::1]:9",
        ][..],
    ] {
        std::fs::write(&file, render_config(&args(flags))).unwrap();
        let c = AgentConfig::resolve(RunArgs {
            config: Some(file.clone()),
            cgroup: Some(dir.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap();
        if !flags.is_empty() {
            assert_eq!(c.node_name, "n2");
            assert_eq!(c.dns_mark, 0x99);
            assert_eq!(c.inbound, "[::1]:9".parse().unwrap());
        }
    }
}

#[test]
fn flags_win_over_a_config_file() {
    let file = args(&["--node-name", "from-file", "--outbound", "127.0.0.1:1"]);
    let flags = args(&["--node-name", "from-flag"]);
    let m = merge(&flags, &file).unwrap();
    assert_eq!(m.node_name.as_deref(), Some("from-flag"));
    assert_eq!(m.outbound, Some("127.0.0.1:1".parse().unwrap()));
}

fn directive<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn socket_units_listen_where_the_config_says() {
    let given = args(&[
        "--outbound",
        "127.0.0.1:25001",
        "--dns",
        "127.0.0.3:25053",
        "--inbound",
        "[::]:25008",
        "--metrics",
        "127.0.0.1:25090",
    ]);
    let text = render_config(&given);
    let s = UnitSettings::resolve(&parse_config(&text, Path::new("t")).unwrap(), false).unwrap();
    let units: Vec<String> = LISTENERS
        .iter()
        .map(|l| render_socket(l, &s, &BY_INSTALL))
        .collect();
    assert_eq!(directive(&units[0], "ListenStream"), ["127.0.0.1:25001"]);
    assert_eq!(directive(&units[1], "ListenDatagram"), ["127.0.0.3:25053"]);
    assert_eq!(directive(&units[2], "ListenStream"), ["127.0.0.3:25053"]);
    assert_eq!(directive(&units[3], "ListenStream"), ["[::]:25008"]);
    assert_eq!(directive(&units[4], "ListenStream"), ["127.0.0.1:25090"]);
    for (l, u) in LISTENERS.iter().zip(&units) {
        assert_eq!(directive(u, "FileDescriptorName"), [l.fd_name]);
        assert_eq!(directive(u, "Service"), [SERVICE_UNIT]);
        assert_eq!(directive(u, "ReusePort"), ["no"]);
    }
    // Defaults when nothing is set.
    let s = UnitSettings::resolve(&RunArgs::default(), false).unwrap();
    assert_eq!(
        directive(
            &render_socket(&LISTENERS[0], &s, &BY_INSTALL),
            "ListenStream"
        ),
        ["127.0.0.1:15001"]
    );
    assert_eq!(
        directive(
            &render_socket(&LISTENERS[1], &s, &BY_INSTALL),
            "ListenDatagram"
        ),
        ["127.0.0.1:15053"]
    );
    assert_eq!(
        directive(
            &render_socket(&LISTENERS[3], &s, &BY_INSTALL),
            "ListenStream"
        ),
        ["0.0.0.0:15008"]
    );
}

#[test]
fn service_runs_the_installed_config_with_its_sockets() {
    let s = UnitSettings::resolve(&args(&["--state-dir", "/srv/hms"]), false).unwrap();
    let unit = render_service(&s, &BY_INSTALL);
    assert_eq!(
        directive(&unit, "ExecStart"),
        ["/usr/local/bin/hms-node-agent run --config /etc/hms/agent.yaml"]
    );
    let sockets = directive(&unit, "Sockets")[0];
    for l in &LISTENERS {
        assert!(sockets.contains(l.unit), "{sockets}");
    }
    assert_eq!(directive(&unit, "Restart"), ["always"]);
    assert_eq!(directive(&unit, "KillMode"), ["mixed"]);
    let rw = directive(&unit, "ReadWritePaths")[0];
    assert!(
        rw.contains("-/srv/hms ") && rw.contains("-/sys/fs/bpf "),
        "{rw}"
    );
    assert!(
        directive(&unit, "StateDirectory").is_empty(),
        "/srv is not systemd's"
    );
    assert_eq!(directive(&unit, "RuntimeDirectory"), ["hms"]);
    let caps = directive(&unit, "CapabilityBoundingSet")[0];
    assert!(caps.contains("CAP_BPF") && !caps.contains("CAP_SYS_ADMIN"));
    let stop: u64 = directive(&unit, "TimeoutStopSec")[0].parse().unwrap();
    assert!(stop > 10, "above the agent's 10 s drain");
}

#[test]
fn systemd_manages_state_and_runtime_dirs_it_can() {
    let s = UnitSettings::resolve(
        &args(&[
            "--state-dir",
            "/var/lib/hms/a",
            "--admin-socket",
            "/run/hms-b/x.sock",
        ]),
        false,
    )
    .unwrap();
    let unit = render_service(&s, &BY_INSTALL);
    assert_eq!(directive(&unit, "StateDirectory"), ["hms/a"]);
    assert_eq!(directive(&unit, "RuntimeDirectory"), ["hms-b"]);
    assert_eq!(managed_dir(Path::new("/var/lib"), "/var/lib"), None);
    assert_eq!(managed_dir(Path::new("/var/lib/a b"), "/var/lib"), None);
}

#[test]
fn manifest_round_trips() {
    let m = Manifest {
        files: vec![("/etc/hms/agent.yaml".into(), 0xdead_beef)],
        dirs: vec!["/etc/hms".into(), "/usr/local/bin".into()],
    };
    assert_eq!(Manifest::parse(&m.render()), m);
    assert_eq!(m.hash_of("/etc/hms/agent.yaml"), Some(0xdead_beef));
}

#[test]
fn install_keeps_an_edited_config_and_replaces_its_own() {
    let root = tempfile::tempdir().unwrap();
    let mk = |flags: &[&str], force: bool| InstallArgs {
        root: root.path().to_path_buf(),
        force,
        settings: args(flags),
    };
    let old = Manifest::default();
    // Fresh: written from the flags.
    let (text, _) = decide_config(root.path(), &mk(&["--node-name", "a"], false), &old).unwrap();
    let path = under(root.path(), CONFIG_PATH);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &text).unwrap();
    let ours = Manifest {
        files: vec![(CONFIG_PATH.into(), fnv1a(text.as_bytes()))],
        dirs: vec![],
    };
    // Ours and unedited: new settings replace it.
    let (text2, _) = decide_config(root.path(), &mk(&["--node-name", "b"], false), &ours).unwrap();
    assert!(text2.contains("node-name: 'b'"));
    // Edited: refused, unless --force; kept when no settings are given.
    std::fs::write(&path, format!("{text}# my note\n")).unwrap();
    let err = decide_config(root.path(), &mk(&["--node-name", "b"], false), &ours)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--force"), "{err}");
    assert!(decide_config(root.path(), &mk(&["--node-name", "b"], true), &ours).is_ok());
    let (kept, action) = decide_config(root.path(), &mk(&[], false), &ours).unwrap();
    assert!(kept.ends_with("# my note\n"));
    assert_eq!(action, Some(FileAction::Kept));
}
