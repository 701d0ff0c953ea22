//! The etcd store against a real three-member etcd cluster (tests/support/etcd.rs).

use crate::support::etcd::EtcdCluster;

#[test]
fn the_test_cluster_survives_a_member_and_regains_quorum() {
    if EtcdCluster::missing() {
        return;
    }
    let mut cluster = EtcdCluster::start(3);
    assert_eq!(cluster.endpoints().len(), 3);
    assert!(cluster.etcdctl(&["put", "/t/a", "1"]).status.success());
    cluster.kill(2);
    assert!(cluster.etcdctl(&["put", "/t/a", "2"]).status.success());
    cluster.restart(2);
    cluster.kill_quorum();
    let refused = cluster.etcdctl(&["--command-timeout=2s", "put", "/t/a", "3"]);
    assert!(
        !refused.status.success(),
        "a write without quorum succeeded"
    );
    cluster.restore_quorum();
    let out = cluster.etcdctl(&["get", "/t/a", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
}
