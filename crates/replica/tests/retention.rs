//! Retention policy of recovery points (`points_to_drop`, a pure function).

use replica::{points_to_drop, Point};

const HOUR: u64 = 3_600_000;

fn point(seq: u64, cut_unix_ms: u64, app_consistent: bool) -> Point {
    Point {
        seq,
        cut_unix_ms,
        dir: format!("p-{seq}"),
        files: vec!["disk0.avhdx".into()],
        app_consistent,
    }
}

#[test]
fn keeps_the_newest_point_of_each_recent_hour() {
    // Four points an hour for five hours (seq 1..=20), two hourly points kept.
    let pts: Vec<Point> = (1..=20u64)
        .map(|s| point(s, (s - 1) * HOUR / 4, false))
        .collect();
    let drop = points_to_drop(&pts, 2, HOUR, &[]);
    let kept: Vec<u64> = pts
        .iter()
        .map(|p| p.seq)
        .filter(|s| !drop.contains(s))
        .collect();
    // The latest (20, hour 4) and the newest of hour 3 (16).
    assert_eq!(kept, vec![16, 20]);
}

#[test]
fn an_application_consistent_point_survives_a_newer_crash_consistent_one() {
    // Hour 0: seq 1 (app-consistent), 2, 3; hour 1: seq 4, 5 (app-consistent), 6.
    let pts = vec![
        point(1, 0, true),
        point(2, HOUR / 3, false),
        point(3, 2 * HOUR / 3, false),
        point(4, HOUR, false),
        point(5, HOUR + HOUR / 3, true),
        point(6, HOUR + 2 * HOUR / 3, false),
    ];
    let drop = points_to_drop(&pts, 2, HOUR, &[]);
    assert_eq!(drop, vec![2, 4]);
    // One hourly point: hour 0 goes whole (its app-consistent point too).
    let drop = points_to_drop(&pts, 1, HOUR, &[]);
    assert_eq!(drop, vec![1, 2, 3, 4]);
}

#[test]
fn only_the_newest_application_consistent_point_of_an_hour_is_kept() {
    let pts = vec![
        point(1, 0, true),
        point(2, HOUR / 4, true),
        point(3, HOUR / 2, false),
    ];
    assert_eq!(points_to_drop(&pts, 4, HOUR, &[]), vec![1]);
    // Pinned points (a failover's) stay whatever they are.
    assert_eq!(points_to_drop(&pts, 4, HOUR, &[1]), Vec::<u64>::new());
}

#[test]
fn every_point_is_its_own_bucket_without_a_bucket_size() {
    let pts: Vec<Point> = (1..=5u64).map(|s| point(s, s, s == 1)).collect();
    assert_eq!(points_to_drop(&pts, 3, 0, &[]), vec![1, 2]);
}
