//! The network-interface side, through rtnetlink: link lookup and creation, MTU, link state,
//! addresses, routes, the kernel-module probe, and link events for drift repair.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder};

const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;
const EOPNOTSUPP: i32 = 95;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("netlink: {action} {interface}: {source}")]
    Netlink {
        action: &'static str,
        interface: String,
        source: rtnetlink::Error,
    },
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error(
        "cannot create {0}: this kernel has no WireGuard module (load it with `modprobe wireguard`, or set backend = \"userspace\" or \"auto\")"
    )]
    NoKernelModule(String),
    #[error("interface {0} appeared while clawnode was creating it; looking again")]
    Appeared(String),
}

/// What the WireGuard kernel module probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSupport {
    Available,
    /// The kernel has no WireGuard (EOPNOTSUPP: no such link kind).
    Missing,
}

/// The state of one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub mtu: Option<u32>,
    /// The link kind as the kernel names it (`wireguard`, `tun`, `bridge`, …); `None` for
    /// links without one (a physical NIC, loopback).
    pub kind: Option<String>,
}

/// What `configure` changed, for logs and idempotency tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkChanges {
    pub mtu: bool,
    pub up: bool,
    pub addresses_added: Vec<IpNet>,
    pub addresses_removed: Vec<IpNet>,
    /// Routes clawnode created (an existing one, EEXIST, is not listed: it is not ours).
    pub routes_added: Vec<IpNet>,
    /// Routes clawnode had created and took away again.
    pub routes_removed: Vec<IpNet>,
}

impl LinkChanges {
    pub fn is_empty(&self) -> bool {
        *self == LinkChanges::default()
    }
}

pub struct Link {
    handle: Handle,
}

impl Link {
    /// Open an rtnetlink connection in the caller's network namespace.
    pub fn connect() -> Result<Self, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub async fn get(&self, name: &str) -> Result<Option<LinkState>, LinkError> {
        let request = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        futures::pin_mut!(request);
        match request.try_next().await {
            Ok(Some(message)) => Ok(Some(link_state(&message))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -ENODEV => Ok(None),
            Err(source) => Err(netlink("look up", name, source)),
        }
    }

    /// Probe for the WireGuard kernel module without side effects: asking for a link with an
    /// impossible MTU fails with EINVAL when the kind exists and EOPNOTSUPP when it does not.
    pub async fn probe_kernel(&self) -> Result<KernelSupport, LinkError> {
        let message = LinkWireguard::new("clawprobe0").mtu(u32::MAX).build();
        match self.handle.link().add(message).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EOPNOTSUPP => {
                Ok(KernelSupport::Missing)
            }
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EINVAL => {
                Ok(KernelSupport::Available)
            }
            Err(source) => Err(netlink("probe wireguard kind with", "clawprobe0", source)),
            Ok(()) => {
                // A kernel that accepted the absurd MTU: undo it, and the module is there.
                let _ = self.delete("clawprobe0").await;
                Ok(KernelSupport::Available)
            }
        }
    }

    /// Create a kernel WireGuard link. Exclusive: a link of that name that appeared since the
    /// caller looked is someone else's, and is reported, never taken.
    pub async fn create_wireguard(&self, name: &str) -> Result<(), LinkError> {
        let message = LinkWireguard::new(name).build();
        match self.handle.link().add(message).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EEXIST => {
                Err(LinkError::Appeared(name.to_string()))
            }
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EOPNOTSUPP => {
                Err(LinkError::NoKernelModule(name.to_string()))
            }
            Err(source) => Err(netlink("create", name, source)),
        }
    }

    /// Delete the link named `name` only if it is the one with `index`: a link of that name
    /// with another index is not the one clawnode made. Returns whether one was deleted.
    pub async fn delete_exact(&self, name: &str, index: u32) -> Result<bool, LinkError> {
        match self.get(name).await? {
            Some(link) if link.index == index => {}
            _ => return Ok(false),
        }
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -ENODEV => Ok(false),
            Err(source) => Err(netlink("delete", name, source)),
        }
    }

    /// Delete the kernel link `name` whatever it is. Only the backend probe's own link.
    async fn delete(&self, name: &str) -> Result<(), LinkError> {
        let Some(link) = self.get(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -ENODEV => Ok(()),
            Err(source) => Err(netlink("delete", name, source)),
        }
    }

    /// Make the link match: MTU, up, exactly `addresses` (IPv6 link-local ones are left alone),
    /// and a route for each of `routes`. Changes nothing that already matches.
    pub async fn configure(
        &self,
        link: &LinkState,
        mtu: u32,
        addresses: &[IpNet],
        routes: &[IpNet],
    ) -> Result<LinkChanges, LinkError> {
        let mut changes = LinkChanges::default();
        let name = link.name.as_str();
        if link.mtu != Some(mtu) || !link.up {
            let message = LinkUnspec::new_with_index(link.index).mtu(mtu).up().build();
            self.handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(|e| netlink("set mtu and up on", name, e))?;
            changes.mtu = link.mtu != Some(mtu);
            changes.up = !link.up;
        }

        let present = self.addresses(link.index, name).await?;
        // Stale addresses go first: deleting a primary address also deletes the secondaries
        // in its subnet, so a new address added before it would vanish with it.
        for (net, message) in present
            .iter()
            .filter(|(n, _)| !addresses.contains(n))
            .cloned()
        {
            if let IpAddr::V6(v6) = net.addr()
                && v6.segments()[0] & 0xffc0 == 0xfe80
            {
                continue;
            }
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(|e| netlink("remove address from", name, e))?;
            changes.addresses_removed.push(net);
        }

        for net in addresses {
            if present.iter().any(|(p, _)| p == net) {
                continue;
            }
            match self
                .handle
                .address()
                .add(link.index, net.addr(), net.prefix_len())
                .execute()
                .await
            {
                Ok(()) => changes.addresses_added.push(*net),
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EEXIST => {}
                Err(e) => return Err(netlink("add address to", name, e)),
            }
        }
        for net in routes {
            if self.add_route(link, *net).await? {
                changes.routes_added.push(*net);
            }
        }
        Ok(changes)
    }

    /// Add the route to `net` through `link`: `true` if this call created it, `false` if it
    /// was there already (someone else's, or one clawnode added before).
    pub async fn add_route(&self, link: &LinkState, net: IpNet) -> Result<bool, LinkError> {
        let Ok(builder) =
            RouteMessageBuilder::<IpAddr>::new().destination_prefix(net.addr(), net.prefix_len())
        else {
            return Ok(false);
        };
        let route = builder.output_interface(link.index).build();
        match self.handle.route().add(route).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -EEXIST => Ok(false),
            Err(e) => Err(netlink("add route via", &link.name, e)),
        }
    }

    /// Remove the route to `net` through link `index`, matching the way `configure` adds it,
    /// so a route to the same network through another link is never touched. `false`: it was
    /// not there (or the link is gone, and the route with it).
    pub async fn remove_route(&self, index: u32, net: IpNet) -> Result<bool, LinkError> {
        let Ok(builder) =
            RouteMessageBuilder::<IpAddr>::new().destination_prefix(net.addr(), net.prefix_len())
        else {
            return Ok(false);
        };
        let route = builder.output_interface(index).build();
        match self.handle.route().del(route).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -ESRCH || e.raw_code() == -ENODEV =>
            {
                Ok(false)
            }
            Err(e) => Err(netlink("remove route via", &format!("link {index}"), e)),
        }
    }

    /// The networks of this host's addresses on every link but `except` (the mesh interface).
    pub async fn local_networks(&self, except: Option<u32>) -> Result<Vec<IpNet>, LinkError> {
        let mut out: Vec<IpNet> = Vec::new();
        let request = self.handle.address().get().execute();
        futures::pin_mut!(request);
        while let Some(message) = request
            .try_next()
            .await
            .map_err(|e| netlink("list addresses of", "all links", e))?
        {
            if Some(message.header.index) == except {
                continue;
            }
            for attribute in &message.attributes {
                if let AddressAttribute::Address(ip) = attribute
                    && let Ok(net) = IpNet::new(*ip, message.header.prefix_len)
                    && !out.contains(&net.trunc())
                {
                    out.push(net.trunc());
                }
            }
        }
        Ok(out)
    }

    /// The link's addresses, each with the message that deletes it.
    async fn addresses(
        &self,
        index: u32,
        name: &str,
    ) -> Result<Vec<(IpNet, AddressMessage)>, LinkError> {
        let mut out = Vec::new();
        let request = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        futures::pin_mut!(request);
        while let Some(message) = request
            .try_next()
            .await
            .map_err(|e| netlink("list addresses of", name, e))?
        {
            if message.header.index != index {
                continue;
            }
            let addr = message.attributes.iter().find_map(|a| {
                let AddressAttribute::Address(ip) = a else {
                    return None;
                };
                Some(*ip)
            });
            if let Some(ip) = addr
                && let Ok(net) = IpNet::new(ip, message.header.prefix_len)
            {
                out.push((net, message));
            }
        }
        Ok(out)
    }
}

pub fn link_state(message: &LinkMessage) -> LinkState {
    let mut state = LinkState {
        index: message.header.index,
        name: String::new(),
        up: message.header.flags.contains(LinkFlags::Up),
        mtu: None,
        kind: None,
    };
    for attribute in &message.attributes {
        if let LinkAttribute::IfName(name) = attribute {
            state.name = name.clone();
        } else if let LinkAttribute::Mtu(mtu) = attribute {
            state.mtu = Some(*mtu);
        } else if let LinkAttribute::LinkInfo(infos) = attribute {
            state.kind = infos.iter().find_map(|info| {
                let LinkInfo::Kind(kind) = info else {
                    return None;
                };
                Some(kind.to_string())
            });
        }
    }
    state
}

fn netlink(action: &'static str, interface: &str, source: rtnetlink::Error) -> LinkError {
    LinkError::Netlink {
        action,
        interface: interface.to_string(),
        source,
    }
}
