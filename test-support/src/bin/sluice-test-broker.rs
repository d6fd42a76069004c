//! `sluice-test-broker`: a Kafka-protocol mock cluster in its own process,
//! for running the tests' external-cluster path (`SLUICE_TEST_KAFKA`)
//! without a real cluster.
//!
//! Prints two lines, then serves until stdin closes (or it is killed):
//!
//! ```text
//! SLUICE_TEST_KAFKA=127.0.0.1:<port>
//! SLUICE_TEST_KAFKA_CONTROL=127.0.0.1:<port>
//! ```
//!
//! The control port takes `create <topic> <partitions>` lines and answers
//! `ok` or `error <why>`: rdkafka's mock cluster does not implement the
//! CreateTopics request.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use rdkafka::mocking::MockCluster;

fn main() {
    // The cluster is not `Send`: it stays on this thread, which serves the
    // control port; another thread ends the process when stdin closes.
    let cluster = MockCluster::new(1).expect("starting a mock cluster");
    let control = TcpListener::bind("127.0.0.1:0").expect("binding the control port");
    let addr = control.local_addr().expect("control address");
    println!("SLUICE_TEST_KAFKA={}", cluster.bootstrap_servers());
    println!("SLUICE_TEST_KAFKA_CONTROL={addr}");
    std::io::stdout().flush().expect("stdout");
    std::thread::spawn(|| {
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
            line.clear();
        }
        std::process::exit(0);
    });
    for conn in control.incoming().flatten() {
        let Ok(mut w) = conn.try_clone() else {
            continue;
        };
        for line in BufReader::new(conn).lines().map_while(Result::ok) {
            let reply = match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["create", topic, partitions] => match partitions.parse() {
                    Ok(p) => match cluster.create_topic(topic, p, 1) {
                        Ok(()) => "ok".to_owned(),
                        Err(e) => format!("error {e}"),
                    },
                    Err(e) => format!("error bad partition count: {e}"),
                },
                _ => "error expected: create <topic> <partitions>".to_owned(),
            };
            if writeln!(w, "{reply}").is_err() {
                break;
            }
        }
    }
}
