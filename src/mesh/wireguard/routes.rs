//! The interface's routes as clawnode owns them: it adds the routes the applied peers need,
//! records those it created (a route that was there already stays someone else's), and
//! removes its own when their peer goes and on stop.

use ipnet::IpNet;

use crate::core::routes::OwnedRoutes;

use super::link::{Link, LinkChanges, LinkError, LinkState};

/// Bring `link` to its MTU, up, `address` and the `wanted` routes, then remove the routes
/// clawnode created that are no longer wanted.
pub async fn configure(
    link: &Link,
    state: &LinkState,
    mtu: u16,
    address: IpNet,
    wanted: &[IpNet],
    owned: &mut OwnedRoutes,
) -> Result<LinkChanges, LinkError> {
    if let Some((old, routes)) = owned.on_link(state.index) {
        // The link was made again: its routes went with the old one, unless it was renamed.
        for net in routes {
            if let Err(error) = link.remove_route(old, net).await {
                tracing::warn!(component = "mesh", route = %net, %error, "cannot remove a route of the previous interface");
            }
        }
    }
    let mut changes = link
        .configure(state, u32::from(mtu), &[address], &[])
        .await?;
    // Recorded one by one, so a failure part-way keeps the record of those already added.
    for net in wanted {
        if link.add_route(state, *net).await? {
            owned.created([*net]);
            changes.routes_added.push(*net);
        }
    }
    for net in owned.stale(wanted) {
        link.remove_route(state.index, net).await?;
        owned.removed(&net);
        changes.routes_removed.push(net);
    }
    Ok(changes)
}

/// Remove every route clawnode created (on stop); failures are logged, the stop goes on.
pub async fn remove_all(link: &Link, owned: &mut OwnedRoutes) {
    let Some((index, routes)) = owned.take_all() else {
        return;
    };
    for net in routes {
        match link.remove_route(index, net).await {
            Ok(_) => tracing::debug!(component = "mesh", route = %net, "removed route"),
            Err(error) => {
                tracing::warn!(component = "mesh", route = %net, %error, "cannot remove route")
            }
        }
    }
}
