//! The changelog store on a real Kafka-protocol broker (a `MockCluster`, or
//! the cluster of `SLUICE_TEST_KAFKA`).

use sluice_state_carrier::{ChangelogStore, Checkpoint, KeyState, Store};
use sluice_test_support::kafka::TestKafka;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_checkpoint_of_each_source_is_restored() {
    let kafka = TestKafka::start();
    let topic = kafka.name("changelog");
    kafka.create_topic(&topic, 1);
    let store = ChangelogStore::open(kafka.servers(), &topic, &[])
        .await
        .expect("opening the changelog");
    let mut a = Checkpoint::new("g/t/0");
    let mut b = Checkpoint::new("g/t/1");
    let saved = tokio::task::spawn_blocking(move || {
        for seq in 1..=3 {
            a.seq = seq;
            a.keys.insert(
                "k".into(),
                KeyState {
                    state: serde_json::json!({ "sum": seq * 10 }),
                    last_offset: seq as i64,
                    ..KeyState::default()
                },
            );
            store.save(&a).expect("save a");
        }
        b.seq = 1;
        store.save(&b).expect("save b");
        (store, a, b)
    })
    .await
    .expect("saving");
    let (store, a, b) = saved;
    // A second store (another node) reads what the first wrote.
    let other = ChangelogStore::open(kafka.servers(), &topic, &[])
        .await
        .expect("opening again");
    let (got_a, all) = tokio::task::spawn_blocking(move || {
        (
            other.load("g/t/0").expect("load"),
            other.list().expect("list"),
        )
    })
    .await
    .expect("loading");
    assert_eq!(got_a, Some(a.clone()));
    assert_eq!(all, vec![a, b]);
    drop(store);
}
