//! A pod's address stops being its identity as soon as the pod stops holding it legitimately.

use crate::harness::*;

/// A deleted pod keeps its object (and, here, its address) while it terminates (here a finalizer
/// holds it, as a kubelet stopping its containers does); the operator takes the address out of the rendered documents as soon as the pod is
/// terminating. A pod of another namespace that receives the address meanwhile inherits nothing:
/// it is refused until its own policy allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_address_inherits_no_permission() {
    let World { dir, rel } = World::boot("e2e-recycle", &["payments", "batch"], &[]).await;
    let c = rel.admin.clone();
    let world = Loopback::start_granting(&rel, &dir.0, &["payments", "batch"]).await;
    let (target, proxy) = (world.target, world.proxy);
    let payments = Api::<Pod>::namespaced(c.clone(), "payments");
    // A finalizer holds the object while it terminates, as a kubelet stopping its containers does.
    let mut held = pod("checkout-1", "client", "127.0.0.21");
    held.metadata.finalizers = Some(vec!["tunnelgate.io/test-hold".into()]);
    run_pod(&payments, held).await;
    let dest = json!({"cidrs": ["127.0.0.2/32"], "ports": [target.port()]});
    Api::<TunnelPolicy>::namespaced(c.clone(), "payments")
        .create(&PostParams::default(), &policy("allow-echo", "client", dest.clone()))
        .await
        .unwrap();
    until("the pod is allowed", 30, || async { connect_from("127.0.0.21", proxy, target).await == 200 }).await;

    // Deleted: the object stays, terminating, until its finalizer is removed.
    payments.delete("checkout-1", &DeleteParams::default()).await.unwrap();
    let terminating = payments.get("checkout-1").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some(), "still there, terminating");
    // Its address goes to a pod of another namespace, with the same labels and no policy.
    run_pod(&Api::<Pod>::namespaced(c.clone(), "batch"), pod("job-1", "client", "127.0.0.21")).await;
    let started = Instant::now();
    until("the address is refused", 10, || async { connect_from("127.0.0.21", proxy, target).await == 403 }).await;
    let refused_after = started.elapsed();
    assert!(
        payments.get("checkout-1").await.unwrap().metadata.deletion_timestamp.is_some(),
        "refused while the old pod's object still exists"
    );
    eprintln!("the recycled address was refused {refused_after:?} after the new pod appeared");
    // Its own policy allows it.
    Api::<TunnelPolicy>::namespaced(c.clone(), "batch")
        .create(&PostParams::default(), &policy("allow-echo", "client", dest))
        .await
        .unwrap();
    until("the new pod's own policy allows it", 30, || async {
        connect_from("127.0.0.21", proxy, target).await == 200
    })
    .await;
}
