use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use lb_common::{IPPROTO_TCP, Method, Sched};

use super::*;
use crate::Capacities;
use reader::close;

const GOOD: &str = r#"
[cluster]
name = "web"
timeout = 100

[nat]
subnet = "203.0.113.0/24"
gateway = "203.0.113.1"

[[atm]]
name = "atm1"
address = "192.0.2.2"
interface = "eth0"

[[service]]
name = "http"
vip = "192.0.2.100"
port = 80
[service.check]
kind = "http"
path = "/"
[[service.server]]
name = "web1"
address = "192.0.2.11"
[[service.server]]
name = "web2"
address = "203.0.113.12"
port = 8080
method = "nat"
weight = 2
"#;

#[test]
fn a_good_file_parses_with_defaults() {
    let c = parse(GOOD, Path::new("/")).unwrap();
    assert_eq!(c.cluster.name, "web");
    assert_eq!(c.tables, Capacities::default());
    assert_eq!(c.ha.port, DEFAULT_HA_PORT);
    assert_eq!(c.control.socket, PathBuf::from(DEFAULT_SOCKET));
    let s = &c.services[0];
    assert_eq!(
        (s.proto, s.scheduler, s.persistence),
        (IPPROTO_TCP, Sched::Maglev, 0)
    );
    assert_eq!(s.servers[0].port, 80, "port defaults to the service's");
    assert_eq!(s.servers[0].method, Method::Direct);
    assert_eq!(s.servers[1].weight, 2);
    assert!(matches!(
        s.check.kind,
        CheckKind::Http {
            expect: 200,
            verify: true,
            ..
        }
    ));
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let text = GOOD
        .replace("timeout = 100", "timeout = 0\ncolour = \"red\"")
        .replace("port = 8080\n", "port = 8080\nweigth = 3\n");
    let problems = parse(&text, Path::new("/")).unwrap_err();
    let lines: Vec<(usize, &str)> = problems
        .iter()
        .map(|p| (p.line, p.message.as_str()))
        .collect();
    assert_eq!(problems.len(), 3, "{lines:?}");
    assert_eq!(problems[0].line, 4);
    assert!(
        problems[0]
            .message
            .contains("`timeout` = 0 is out of range"),
        "{lines:?}"
    );
    assert_eq!(problems[1].line, 5);
    assert!(
        problems[1]
            .message
            .contains("unknown key `colour` in [cluster]"),
        "{lines:?}"
    );
    assert!(
        problems[2]
            .message
            .contains("unknown key `weigth` in [[service.server]] (did you mean `weight`?)"),
        "{lines:?}"
    );
}

/// The problems of GOOD with `from` replaced by `to`, as `(line, message)`.
fn problems_with(from: &str, to: &str) -> Vec<(usize, String)> {
    assert!(GOOD.contains(from), "{from:?} is not in GOOD");
    match parse(&GOOD.replacen(from, to, 1), Path::new("/")) {
        Ok(_) => Vec::new(),
        Err(problems) => problems.into_iter().map(|p| (p.line, p.message)).collect(),
    }
}

#[test]
fn names_are_one_word_of_at_most_64_bytes() {
    // toml_edit writes the name as TOML (Rust's {:?} escapes are not all TOML's).
    let name = |n: &str| {
        let toml = toml_edit::Value::from(n).to_string();
        problems_with("name = \"web1\"", &format!("name = {}", toml.trim()))
    };
    assert_eq!(name(&"w".repeat(NAME_MAX)), vec![]);
    assert_eq!(
        name(&"w".repeat(NAME_MAX + 1)),
        vec![(
            23,
            "`name` is 65 bytes long: names are at most 64 bytes".into()
        )]
    );
    // Multi-byte characters count in bytes, as the tables and messages carry them.
    assert_eq!(
        name(&"é".repeat(33))[0].1,
        "`name` is 66 bytes long: names are at most 64 bytes"
    );
    for bad in [
        "web 1",
        "web\t1",
        "web\n1",
        "web\u{a0}1",
        "web\u{7f}",
        "web\r",
    ] {
        assert_eq!(
            name(bad),
            vec![(
                23,
                format!("`name` = {bad:?} must not contain spaces or control characters")
            )],
        );
    }
    // Too long and with spaces: both said, without echoing the long name.
    let long = "w ".repeat(40);
    assert_eq!(
        name(&long),
        vec![
            (
                23,
                "`name` is 80 bytes long: names are at most 64 bytes".into()
            ),
            (
                23,
                "`name` must not contain spaces or control characters".into()
            ),
        ]
    );
    // Every table's name is checked.
    for from in ["name = \"web\"", "name = \"atm1\"", "name = \"http\""] {
        let p = problems_with(from, "name = \"a b\"");
        assert_eq!(p.len(), 1, "{from}: {p:?}");
        assert!(p[0].1.contains("must not contain spaces"), "{from}: {p:?}");
    }
}

#[test]
fn addresses_no_machine_can_hold_are_refused() {
    let kinds = [
        ("0.0.0.0", "the unspecified address"),
        ("255.255.255.255", "the broadcast address"),
        ("127.0.0.1", "a loopback address"),
        ("127.1.2.3", "a loopback address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
    ];
    for (from, key, line, role) in [
        ("vip = \"192.0.2.100\"", "vip", 17, "a VIP"),
        (
            "address = \"192.0.2.11\"",
            "address",
            24,
            "a server's address",
        ),
        ("address = \"192.0.2.2\"", "address", 12, "an ATM's address"),
    ] {
        for (a, what) in kinds {
            assert_eq!(
                problems_with(from, &format!("{key} = \"{a}\"")),
                vec![(
                    line,
                    format!("`{key}` = {a} is {what}: it cannot be {role}")
                )],
            );
        }
    }
    // The gateway must be in its subnet, so each kind needs a subnet of its own.
    for (subnet, a, what) in [
        ("0.0.0.0/8", "0.0.0.0", "the unspecified address"),
        (
            "255.255.255.0/24",
            "255.255.255.255",
            "the broadcast address",
        ),
        ("127.0.0.0/8", "127.0.0.1", "a loopback address"),
        ("224.0.0.0/24", "224.0.0.1", "a multicast address"),
    ] {
        let text = GOOD
            .replace("203.0.113.0/24", subnet)
            .replace("gateway = \"203.0.113.1\"", &format!("gateway = \"{a}\""));
        let problems = parse(&text, Path::new("/")).unwrap_err();
        assert_eq!(
            problems[0],
            Problem {
                line: 8,
                message: format!("`gateway` = {a} is {what}: it cannot be the NAT gateway")
            }
        );
    }
    // Addresses next to the refused ranges are fine.
    for a in ["1.0.0.1", "126.255.255.254", "128.0.0.1", "223.255.255.254"] {
        assert_eq!(
            problems_with("vip = \"192.0.2.100\"", &format!("vip = \"{a}\"")),
            vec![]
        );
    }
}

#[test]
fn problems_across_tables_have_a_line() {
    // The NAT gateway at the ATM: on the gateway's line, naming the ATM's.
    assert_eq!(
        problems_with("address = \"192.0.2.2\"", "address = \"203.0.113.1\""),
        vec![(
            8,
            "the NAT gateway 203.0.113.1 is an ATM's own address (ATM \"atm1\", line 12)".into()
        )]
    );
    // Capacities: on the key's line, else on the [tables] header's.
    let tables = "[tables]\nservices = 1\nservers = 1\n\n[nat]";
    assert_eq!(
        problems_with("[nat]", tables),
        vec![(8, "2 server lines do not fit [tables] servers = 1".into())]
    );
    assert_eq!(
        problems_with(
            "[nat]",
            "[tables]\nconnections = 1024\nservices = 1\n\n[nat]"
        ),
        vec![]
    );
    let text = format!("{GOOD}\n[[service]]\nname = \"b\"\nvip = \"192.0.2.101\"\nport = 80\n");
    let tables = "[tables]\nconnections = 1024\nservices = 1\n\n[nat]";
    let p = parse(&text.replacen("[nat]", tables, 1), Path::new("/")).unwrap_err();
    assert_eq!(
        (p[0].line, p[0].message.as_str()),
        (8, "2 services do not fit [tables] services = 1")
    );
    let p = parse(
        &text.replacen("[nat]", "[tables]\n\n[nat]", 1),
        Path::new("/"),
    );
    assert!(p.is_ok(), "the defaults hold 2 services: {p:?}");
    // Two ATMs without a key: on the [cluster] header.
    let atm2 = "[[atm]]\nname = \"atm2\"\naddress = \"192.0.2.3\"\ninterface = \"eth0\"\n\n[[atm]]";
    let p = problems_with("[[atm]]", atm2);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, 2);
}

#[test]
fn a_vip_is_no_other_services_server() {
    // web1's address is also server x of the second service: a third service's VIP at it
    // is refused, naming the first server at it; one at y names y.
    let two = "\n[[service]]\nname = \"two\"\nvip = \"192.0.2.101\"\nport = 80\n\
               [service.check]\nkind = \"none\"\n\
               [[service.server]]\nname = \"x\"\naddress = \"192.0.2.11\"\n\
               [[service.server]]\nname = \"y\"\naddress = \"192.0.2.12\"\n";
    let three = |vip: &str| {
        let text = format!(
            "{GOOD}{two}\n[[service]]\nname = \"three\"\nvip = \"{vip}\"\nport = 80\n\
             [service.check]\nkind = \"none\"\n"
        );
        let line_of = |l: &str| text.lines().position(|x| x == l).unwrap() + 1;
        let vip_line = line_of(&format!("vip = \"{vip}\""));
        let p = parse(&text, Path::new("/")).unwrap_err();
        (
            p,
            vip_line,
            line_of("address = \"192.0.2.11\""),
            line_of("address = \"192.0.2.12\""),
        )
    };
    let (p, vip_line, web1, _) = three("192.0.2.11");
    assert_eq!(
        p,
        vec![Problem {
            line: vip_line,
            message: format!(
                "the VIP 192.0.2.11 is server \"web1\" of service \"http\" (line {web1})"
            )
        }]
    );
    let (p, vip_line, _, y) = three("192.0.2.12");
    assert_eq!(
        p,
        vec![Problem {
            line: vip_line,
            message: format!("the VIP 192.0.2.12 is server \"y\" of service \"two\" (line {y})")
        }]
    );
    // The same server address in two services is fine.
    assert!(parse(&format!("{GOOD}{two}"), Path::new("/")).is_ok());
}

#[test]
fn the_socket_and_the_mount_differ_even_by_default() {
    let control = |c: &str| problems_with("[nat]", &format!("[control]\n{c}\n\n[nat]"));
    assert_eq!(
        control("socket = \"/run/lb/cluster\""),
        vec![(
            7,
            "`socket` = \"/run/lb/cluster\" is the same path as `mount` (its default): the \
             control socket and the tables' mount need a path each"
                .into()
        )]
    );
    assert_eq!(
        control("socket = \"/run/lb/x/\"\nmount = \"/run/lb/x\""),
        vec![(
            8,
            "`mount` = \"/run/lb/x/\" is the same path as `socket` (line 7): the control \
             socket and the tables' mount need a path each"
                .into()
        )]
    );
    assert_eq!(control("mount = \"/run/lb/control.sock\"")[0].0, 7);
    assert_eq!(
        control("socket = \"/run/lb/a\"\nmount = \"/run/lb/b\""),
        vec![]
    );
}

/// A path of its own in the temporary directory, removed when the test ends.
struct TempPath(PathBuf);

impl TempPath {
    fn new(tag: &str) -> Self {
        let name = format!("lb-config-test-{}-{tag}", std::process::id());
        TempPath(std::env::temp_dir().join(name))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_file_over_the_size_limit_is_refused_whole() {
    let f = TempPath::new("big.toml");
    // A good config padded with a comment: only its size can be wrong.
    let limit = CONFIG_MAX_BYTES as usize;
    let mut text = GOOD.to_string() + "#";
    text += &"x".repeat(limit - text.len());
    text += "x";
    std::fs::write(&f.0, &text).unwrap();
    let problems = load(&f.0).unwrap_err();
    assert_eq!(
        problems,
        vec![Problem {
            line: 0,
            message: format!(
                "{} is larger than 16 MiB (the limit for a config file)",
                f.0.display()
            ),
        }]
    );
    text.pop();
    std::fs::write(&f.0, &text).unwrap();
    assert!(load(&f.0).is_ok(), "a file of exactly the limit is read");
}

#[test]
fn devices_and_pipes_are_refused_without_reading_them() {
    let problems = load(Path::new("/dev/zero")).unwrap_err();
    assert_eq!(problems[0].message, "/dev/zero is not a regular file");
    // A FIFO with no writer would block a plain open.
    let fifo = TempPath::new("fifo");
    nix::unistd::mkfifo(&fifo.0, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let problems = load(&fifo.0).unwrap_err();
    assert_eq!(
        problems[0].message,
        format!("{} is not a regular file", fifo.0.display())
    );
}

#[test]
fn text_that_is_not_utf8_is_reported_at_its_line() {
    let f = TempPath::new("latin1.toml");
    std::fs::write(&f.0, b"[cluster]\nname = \"caf\xe9\"\n").unwrap();
    let problems = load(&f.0).unwrap_err();
    assert_eq!(
        problems,
        vec![Problem {
            line: 2,
            message: "not UTF-8 text".into()
        }]
    );
}

#[test]
fn typos_are_close() {
    assert!(close("weigth", "weight"));
    assert!(close("adress", "address"));
    assert!(close("portt", "port"));
    assert!(!close("colour", "timeout"));
}

#[test]
fn ipv6_vips_and_servers_are_read_and_must_share_a_family() {
    let v6 = GOOD
        .replacen("vip = \"192.0.2.100\"", "vip = \"2001:db8::100\"", 1)
        .replacen("address = \"192.0.2.11\"", "address = \"2001:db8::11\"", 1);
    // web2 is a NAT server at an IPv4 address: a family of its own.
    let problems = parse(&v6, Path::new("/")).unwrap_err();
    assert_eq!(
        problems,
        vec![Problem {
            line: 27,
            message: "server 203.0.113.12 is IPv4 but the VIP 2001:db8::100 (line 17) is IPv6: \
                      a service and its servers share a family"
                .into()
        }]
    );
    let only_v6 = v6.replace(
        "[[service.server]]\nname = \"web2\"\naddress = \"203.0.113.12\"\nport = 8080\nmethod = \"nat\"\nweight = 2\n",
        "",
    );
    let c = parse(&only_v6, Path::new("/")).unwrap();
    assert_eq!(
        c.services[0].vip,
        "2001:db8::100".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        c.services[0].servers[0].address,
        "2001:db8::11".parse::<IpAddr>().unwrap()
    );
    // The reverse: an IPv6 server under an IPv4 VIP, reported at its address line.
    assert_eq!(
        problems_with("address = \"192.0.2.11\"", "address = \"2001:db8::11\""),
        vec![(
            24,
            "server 2001:db8::11 is IPv6 but the VIP 192.0.2.100 (line 17) is IPv4: a service \
             and its servers share a family"
                .into()
        )]
    );
}

#[test]
fn ipv6_addresses_no_host_can_hold_are_refused() {
    for (a, what) in [
        ("::", "the unspecified address"),
        ("::1", "a loopback address"),
        ("ff02::1", "a multicast address"),
        ("fe80::1", "a link-local address"),
        (
            "::ffff:192.0.2.100",
            "an IPv4-mapped address (write the IPv4 address itself)",
        ),
    ] {
        assert_eq!(
            problems_with("vip = \"192.0.2.100\"", &format!("vip = \"{a}\"")),
            vec![(17, format!("`vip` = {a} is {what}: it cannot be a VIP"))],
        );
    }
    // Not an address at all.
    assert_eq!(
        problems_with("vip = \"192.0.2.100\"", "vip = \"2001:db8::g\""),
        vec![(
            17,
            "`vip` = \"2001:db8::g\" is not an IPv4 or IPv6 address".into()
        )],
    );
}

/// Two dual-stack ATMs, NAT44 and NAT66, and an IPv6 service with a server of each method.
const DUAL: &str = r#"
[cluster]
name = "web"
auth_key_file = "/etc/lb/key"

[nat]
subnet = "203.0.113.0/24"
gateway = "203.0.113.1"
subnet6 = "2001:db8:1::/64"
gateway6 = "2001:db8:1::1"

[[atm]]
name = "atm1"
address = "192.0.2.2"
address6 = "2001:db8::2"
interface = "eth0"

[[atm]]
name = "atm2"
address = "192.0.2.3"
address6 = "2001:db8::3"
interface = "eth0"

[[service]]
name = "http6"
vip = "2001:db8::100"
port = 80
[[service.server]]
name = "d"
address = "2001:db8::11"
[[service.server]]
name = "t"
address = "2001:db8::12"
method = "tunnel"
[[service.server]]
name = "n"
address = "2001:db8:1::13"
port = 8080
method = "nat"
"#;

fn dual_problems(from: &str, to: &str) -> Vec<String> {
    assert!(DUAL.contains(from), "{from:?} is not in DUAL");
    match parse(&DUAL.replacen(from, to, 1), Path::new("/")) {
        Ok(_) => Vec::new(),
        Err(problems) => problems.into_iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn dual_stack_atms_and_nat66_are_read() {
    let c = parse(DUAL, Path::new("/")).unwrap();
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    assert_eq!(c.atms[0].v6(), Some(v6("2001:db8::2")));
    assert_eq!(c.atms[0].v4(), Some("192.0.2.2".parse().unwrap()));
    let nat = c.nat.unwrap();
    let n6 = nat.v6.unwrap();
    assert_eq!(
        (n6.subnet, n6.prefix, n6.gateway),
        (v6("2001:db8:1::"), 64, v6("2001:db8:1::1"))
    );
    assert!(nat.contains("2001:db8:1::13".parse().unwrap()));
    assert!(nat.is_gateway("2001:db8:1::1".parse().unwrap()));
    assert_eq!(
        nat.addresses().map(|a| a.to_string()).collect::<Vec<_>>(),
        ["203.0.113.1", "2001:db8:1::1"]
    );
    // IPv6 alone: ATMs whose address is IPv6 (heartbeats over IPv6), NAT66 without NAT44.
    let v6_only = DUAL
        .replace(
            "subnet = \"203.0.113.0/24\"\ngateway = \"203.0.113.1\"\n",
            "",
        )
        .replace("address = \"192.0.2.2\"\naddress6", "address")
        .replace("address = \"192.0.2.3\"\naddress6", "address");
    let c = parse(&v6_only, Path::new("/")).unwrap();
    assert_eq!(c.atms[1].address, "2001:db8::3".parse::<IpAddr>().unwrap());
    assert_eq!((c.atms[1].v4(), c.atms[1].address6), (None, None));
    assert!(c.nat.unwrap().v4.is_none());
}

#[test]
fn dual_stack_mistakes_are_refused_at_their_line() {
    // A tunnel leaves from the ATM's own address of the server's family.
    assert_eq!(
        dual_problems("address6 = \"2001:db8::3\"\n", ""),
        [
            "line 32: tunnel server 2001:db8::12 is IPv6: its tunnel leaves from the primary \
          ATM's IPv6 address, and ATM \"atm2\" (line 18) has none (give it `address6`)"
        ]
    );
    // Heartbeats go between `address`es of one family.
    assert_eq!(
        dual_problems(
            "address = \"192.0.2.3\"\naddress6 = \"2001:db8::3\"",
            "address = \"2001:db8::3\""
        ),
        [
            "line 20: ATM \"atm2\"'s address 2001:db8::3 and ATM \"atm1\"'s 192.0.2.2 (line 14) are \
          of two families: heartbeats go between the ATMs' `address`es, which share one (a \
          dual-stack ATM takes its other family's address in `address6`)"
        ]
    );
    assert_eq!(
        dual_problems("address = \"192.0.2.3\"", "address = \"2001:db8::4\""),
        [
            "line 21: `address6` = 2001:db8::3 beside an IPv6 `address` (2001:db8::4, line 20): \
          `address6` is the IPv6 address of an ATM whose `address` is IPv4"
        ]
    );
    assert_eq!(
        dual_problems("address6 = \"2001:db8::3\"", "address6 = \"192.0.2.9\""),
        ["line 21: `address6` = \"192.0.2.9\" is not an IPv6 address"]
    );
    assert_eq!(
        dual_problems("address6 = \"2001:db8::3\"", "address6 = \"2001:db8::2\""),
        ["line 21: duplicate ATM address 2001:db8::2 (first on line 15)"]
    );
    // NAT66: the server in the IPv6 subnet, which is there.
    assert_eq!(
        dual_problems(
            "address = \"2001:db8:1::13\"",
            "address = \"2001:db8:2::13\""
        ),
        ["line 37: NAT server 2001:db8:2::13 is not in the NAT subnet 2001:db8:1::/64"]
    );
    assert_eq!(
        dual_problems("address = \"2001:db8:1::13\"", "address = \"2001:db8:1::\""),
        [
            "line 37: NAT server 2001:db8:1:: is the NAT subnet 2001:db8:1::/64's subnet-router \
          anycast address, which no host can have"
        ]
    );
    assert_eq!(
        dual_problems(
            "subnet6 = \"2001:db8:1::/64\"\ngateway6 = \"2001:db8:1::1\"\n",
            ""
        ),
        [
            "line 35: NAT server 2001:db8:1::13 is IPv6, and [nat] has no IPv6 subnet: NAT66 needs \
          `subnet6` and `gateway6`"
        ]
    );
    assert_eq!(
        dual_problems("gateway6 = \"2001:db8:1::1\"\n", ""),
        ["line 6: [nat] needs `gateway6`"]
    );
    assert_eq!(
        dual_problems(
            "gateway6 = \"2001:db8:1::1\"",
            "gateway6 = \"2001:db8:2::1\""
        ),
        ["line 10: `gateway6` 2001:db8:2::1 is not in the NAT subnet 2001:db8:1::/64"]
    );
    assert_eq!(
        dual_problems(
            "gateway6 = \"2001:db8:1::1\"",
            "gateway6 = \"2001:db8:1::\""
        ),
        [
            "line 10: `gateway6` 2001:db8:1:: is the NAT subnet 2001:db8:1::/64's subnet-router \
          anycast address, which no host can have"
        ]
    );
    for (subnet, why) in [
        ("2001:db8:1::/127", "the prefix length must be 16 to 126"),
        (
            "2001:db8:1::1/64",
            "has host bits set: write the network address",
        ),
        (
            "203.0.113.0/24",
            "must be an IPv6 ADDRESS/PREFIX, e.g. 2001:db8:1::/64",
        ),
    ] {
        let sep = if why.starts_with("the") { ": " } else { " " };
        assert_eq!(
            dual_problems(
                "subnet6 = \"2001:db8:1::/64\"",
                &format!("subnet6 = \"{subnet}\"")
            ),
            [format!("line 9: `subnet6` = {subnet:?}{sep}{why}")]
        );
    }
    assert_eq!(
        dual_problems("subnet6 = \"2001:db8:1::/64\"", "subnet6 = \"fe80::/64\""),
        ["line 9: `subnet6` = \"fe80::/64\" is a link-local address: no server can be in it"]
    );
    // The VIP and the NAT66 side.
    assert_eq!(
        dual_problems("vip = \"2001:db8::100\"", "vip = \"2001:db8:1::1\""),
        ["line 26: the VIP 2001:db8:1::1 is the NAT gateway (line 10)"]
    );
    assert_eq!(
        dual_problems("vip = \"2001:db8::100\"", "vip = \"2001:db8:1::100\""),
        [
            "line 26: the VIP 2001:db8:1::100 is inside the NAT subnet 2001:db8:1::/64 (line 9), \
          which is the NAT servers' side"
        ]
    );
    assert_eq!(
        dual_problems("vip = \"2001:db8::100\"", "vip = \"2001:db8::3\""),
        ["line 24: the VIP 2001:db8::3 is an ATM's own address"]
    );
    assert_eq!(
        dual_problems("address = \"2001:db8::11\"", "address = \"2001:db8::2\""),
        [
            "line 30: direct server 2001:db8::2 is the address of ATM \"atm1\" (line 15): an ATM \
          cannot balance to itself"
        ]
    );
    // [nat] with neither family.
    assert_eq!(
        dual_problems(
            "subnet = \"203.0.113.0/24\"\ngateway = \"203.0.113.1\"\nsubnet6 = \"2001:db8:1::/64\"\ngateway6 = \"2001:db8:1::1\"\n",
            ""
        ),
        [
            "line 6: [nat] needs `subnet` and `gateway` (NAT44), `subnet6` and `gateway6` (NAT66), \
          or both"
        ]
    );
}
