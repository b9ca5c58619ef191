//! Synthetic policies of N rules for the bench, and the same allow-list as an nftables
//! ruleset: mixed identities (uids, gids, and where asked cgroups that do not exist),
//! distinct non-nested CIDRs (/32s and /24s), a few port sets with ranges, tcp and udp.

/// Port sets the filler rules cycle through (few distinct edges, so decision entries stay
/// about one per rule, as in real policies).
const PORT_SETS: &[&[&str]] = &[
    &["53"],
    &["80", "443"],
    &["8000-8100"],
    &["1024-2047"],
    &["22"],
    &["5000-5100"],
];

/// The rule counts a scenario measures: `full` (the sizes), or 1, 2 and 5 with
/// `--quick` (the CI smoke test).
pub fn tiers(quick: bool, full: [usize; 3]) -> Vec<usize> {
    if quick {
        vec![1, 2, 5]
    } else {
        full.to_vec()
    }
}

/// A rule count as the variants name it: 10, 10k, 100k.
pub fn short(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

pub const IDENTITIES_PER_KIND: usize = 20;

/// The i-th filler CIDR: every eighth (i % 8 == 7) a /24 in 11.0.0.0/8, the others /32s at odd
/// addresses of 10.0.0.0/8 (none contains another, none contains 127.0.0.1).
pub fn cidr(i: usize) -> String {
    if i % 8 == 7 {
        let j = (i / 8) as u32;
        let a = (11u32 << 24) | (j << 8);
        format!("{}/24", std::net::Ipv4Addr::from(a))
    } else {
        let a = (10u32 << 24) + 2 * i as u32 + 1;
        format!("{}/32", std::net::Ipv4Addr::from(a))
    }
}

/// What the filler identities are keyed by.
#[derive(Clone, Copy)]
pub enum Kinds {
    /// uids and gids (expressible in nftables as `meta skuid` / `meta skgid`).
    UidGid,
    /// uids, gids and cgroups (under `ghost_base`, which does not exist).
    UidGidCgroup,
}

pub struct Filler {
    /// `[identity.*]` tables.
    pub identities: String,
    /// `[[rule]]` tables.
    pub rules: String,
    /// The egress rules as nft set elements.
    pub nft: Vec<NftElem>,
}

/// One `ip daddr . th dport` element of the set of (socket uid or gid, protocol).
pub struct NftElem {
    /// `skuid` or `skgid`.
    pub key: &'static str,
    pub id: usize,
    pub proto: &'static str,
    /// `CIDR . PORT[-PORT]`.
    pub elem: String,
}

/// `n` filler rules; `ingress_every`: every k-th is an ingress allow (0: none).
pub fn filler(n: usize, kinds: Kinds, ghost_base: &str, ingress_every: usize) -> Filler {
    let mut identities = String::new();
    let mut names = Vec::new();
    for k in 0..IDENTITIES_PER_KIND {
        identities.push_str(&format!("[identity.u{k}]\nuid = {}\n\n", 2000 + k));
        names.push((format!("u{k}"), Some(("skuid", 2000 + k))));
        identities.push_str(&format!("[identity.g{k}]\ngid = {}\n\n", 3000 + k));
        names.push((format!("g{k}"), Some(("skgid", 3000 + k))));
        if let Kinds::UidGidCgroup = kinds {
            identities.push_str(&format!(
                "[identity.c{k}]\ncgroup = \"{ghost_base}/ghost-{k}\"\n\n"
            ));
            names.push((format!("c{k}"), None));
        }
    }
    let mut rules = String::with_capacity(n * 100);
    let mut nft = Vec::with_capacity(n);
    for i in 0..n {
        let (name, nft_id) = &names[i % names.len()];
        let ports = PORT_SETS[i % PORT_SETS.len()];
        let proto = if i % 2 == 0 { "tcp" } else { "udp" };
        let peer = cidr(i);
        let ingress = ingress_every > 0 && i % ingress_every == ingress_every - 1;
        let list = ports
            .iter()
            .map(|p| {
                if p.contains('-') {
                    format!("\"{p}\"")
                } else {
                    p.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        rules.push_str(&format!(
            "[[rule]]\naction = \"allow\"\n{}identity = \"{name}\"\npeer = \"{peer}\"\nports = [{list}]\nproto = \"{proto}\"\n\n",
            if ingress { "direction = \"ingress\"\n" } else { "" }
        ));
        if let (Some((key, id)), false) = (nft_id, ingress) {
            for p in ports {
                nft.push(NftElem {
                    key,
                    id: *id,
                    proto,
                    elem: format!("{peer} . {p}"),
                });
            }
        }
    }
    Filler {
        identities,
        rules,
        nft,
    }
}

/// The nftables equivalent of a [`Filler`]'s egress allow-list as one `nft -f` file that
/// replaces table `inet ztbench` atomically: an interval set of `ip daddr . th dport` per
/// (socket uid or gid, protocol) and a rule matching each in an output chain with `policy
/// drop`. (One set of all four fields, or a rule per zt rule, is how nft would be written
/// naively: `nft -f` of 100k of those takes minutes here.)
pub fn nft_ruleset(f: &Filler) -> String {
    let mut sets: std::collections::BTreeMap<String, (String, Vec<&str>)> = Default::default();
    for e in &f.nft {
        let name = format!("{}_{}_{}", e.key, e.id, e.proto);
        sets.entry(name)
            .or_insert_with(|| {
                (
                    format!("meta l4proto {} meta {} {}", e.proto, e.key, e.id),
                    Vec::new(),
                )
            })
            .1
            .push(&e.elem);
    }
    let mut s = String::with_capacity(f.nft.len() * 32 + 1024);
    s.push_str("table inet ztbench\ndelete table inet ztbench\ntable inet ztbench {\n");
    for (name, (_, elems)) in &sets {
        s.push_str(&format!(
            "  set {name} {{\n    typeof ip daddr . th dport\n    flags interval\n    elements = {{ {} }}\n  }}\n",
            elems.join(", ")
        ));
    }
    s.push_str("  chain output {\n    type filter hook output priority 0; policy drop;\n");
    for (name, (matches, _)) in &sets {
        s.push_str(&format!(
            "    {matches} ip daddr . th dport @{name} accept\n"
        ));
    }
    s.push_str("  }\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_rules_and_their_nft_equivalent() {
        let f = filler(16, Kinds::UidGid, "", 0);
        assert_eq!(f.rules.matches("[[rule]]").count(), 16);
        assert_eq!(f.identities.matches("[identity.").count(), 40);
        // Every egress rule becomes one element per port item.
        let items: usize = (0..16).map(|i| PORT_SETS[i % PORT_SETS.len()].len()).sum();
        assert_eq!(f.nft.len(), items);
        let nft = nft_ruleset(&f);
        assert!(nft.starts_with("table inet ztbench\ndelete table inet ztbench\n"));
        assert!(nft.contains("set skuid_2000_tcp {"));
        assert!(nft.contains(
            "meta l4proto tcp meta skuid 2000 ip daddr . th dport @skuid_2000_tcp accept"
        ));
        assert!(nft.contains("10.0.0.1/32 . 53"));
        // Ingress rules and cgroup identities have no nft element.
        let g = filler(10, Kinds::UidGidCgroup, "x", 5);
        assert_eq!(g.rules.matches("direction = \"ingress\"").count(), 2);
        assert!(g.identities.contains("cgroup = \"x/ghost-0\""));
    }

    #[test]
    fn cidrs_are_distinct_and_not_nested() {
        assert_eq!(cidr(0), "10.0.0.1/32");
        assert_eq!(cidr(7), "11.0.0.0/24");
        assert_eq!(cidr(15), "11.0.1.0/24");
        let all: std::collections::BTreeSet<String> = (0..100_000).map(cidr).collect();
        assert_eq!(all.len(), 100_000);
        assert_eq!(short(100_000), "100k");
        assert_eq!(short(10), "10");
    }
}
