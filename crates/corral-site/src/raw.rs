//! Stage one: serde structs mirroring the files exactly. Every value that needs checking is a
//! `Spanned<String>` so stage two ([`crate::load`]) can say where it is; every key is optional
//! here so a missing key becomes a precise problem instead of a serde error.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use toml::Spanned;

pub(crate) type S = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSite {
    pub(crate) server: Option<RawServer>,
    pub(crate) dhcp: Option<RawDhcp>,
    pub(crate) paths: Option<RawPaths>,
    pub(crate) store: Option<RawStore>,
    pub(crate) discovery: Option<RawDiscovery>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) name: Option<String>,
    pub(crate) interfaces: Option<Vec<S>>,
    pub(crate) advertise: Option<S>,
    pub(crate) http_port: Option<u16>,
    pub(crate) tftp_port: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDhcp {
    pub(crate) mode: Option<S>,
    pub(crate) network: Option<Vec<Spanned<RawNetwork>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub(crate) name: Option<String>,
    pub(crate) cidr: Option<S>,
    pub(crate) gateway: Option<S>,
    pub(crate) dns: Option<Vec<S>>,
    pub(crate) domain: Option<S>,
    pub(crate) pool: Option<S>,
    pub(crate) lease: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPaths {
    pub(crate) boot: Option<String>,
    pub(crate) images: Option<String>,
    pub(crate) trees: Option<String>,
    pub(crate) ipxe: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) path: Option<String>,
    pub(crate) max_age: Option<S>,
    pub(crate) max_events: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiscovery {
    pub(crate) enrol: Option<bool>,
    pub(crate) profile: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    pub(crate) description: Option<String>,
    pub(crate) boot: Option<Spanned<RawBoot>>,
    pub(crate) install: Option<RawInstall>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBoot {
    pub(crate) kernel: Option<String>,
    pub(crate) initrd: Option<OneOrMany<String>>,
    pub(crate) cmdline: Option<String>,
    pub(crate) ipxe_template: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInstall {
    pub(crate) image: Option<String>,
    pub(crate) tree: Option<String>,
    pub(crate) after: Option<S>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMachine {
    pub(crate) mac: Option<Spanned<OneOrMany<S>>>,
    pub(crate) hostname: Option<S>,
    pub(crate) ip: Option<S>,
    pub(crate) profile: Option<S>,
    pub(crate) groups: Option<Vec<String>>,
    pub(crate) vars: Option<BTreeMap<String, String>>,
}

/// A value written either as one item or as a list (`mac = "..."` or `mac = ["...", "..."]`).
///
/// Hand-written rather than `#[serde(untagged)]`: untagged enums buffer their input and so
/// lose `Spanned` positions.
#[derive(Debug)]
pub(crate) enum OneOrMany<T> {
    One(String),
    Many(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OneOrMany::One(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(x) = seq.next_element()? {
                    out.push(x);
                }
                Ok(OneOrMany::Many(out))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}
