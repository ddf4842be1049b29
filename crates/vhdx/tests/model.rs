//! Random operations checked against a plain `Vec<u8>` model (proptest).

mod common;
use proptest::prelude::*;
use vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const SIZE: u64 = 12 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Unmap(u64, u64),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SIZE, 1usize..300_000, any::<u8>()).prop_map(|(o, l, s)| Op::Write(o, l, s)),
        1 => (0..SIZE, 1u64..3_000_000).prop_map(|(o, l)| Op::Zero(o, l)),
        1 => (0..SIZE, 1u64..3_000_000).prop_map(|(o, l)| Op::Unmap(o, l)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn run_ops(kind: u8, ops: Vec<Op>) {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("m.vhdx");
    let mut model = vec![0u8; SIZE as usize];
    let ls = if kind == 1 { 4096 } else { 512 };
    if kind == 2 {
        let base = d.path().join("base.vhdx");
        let b = Vhdx::create(
            &base,
            &CreateOptions {
                size: SIZE,
                block_size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let fill = common::pattern(99, SIZE as usize);
        b.write_at(&fill, 0).unwrap();
        b.close().unwrap();
        model.copy_from_slice(&fill);
        Vhdx::create(
            &img,
            &CreateOptions {
                disk_type: DiskType::Differencing,
                parent: Some(base),
                ..Default::default()
            },
        )
        .unwrap()
        .close()
        .unwrap();
    } else {
        Vhdx::create(
            &img,
            &CreateOptions {
                size: SIZE,
                block_size: 1 << 20,
                logical_sector_size: ls,
                ..Default::default()
            },
        )
        .unwrap()
        .close()
        .unwrap();
    }
    let mut v = Vhdx::open(&img, OpenOptions { read_only: false }).unwrap();
    for o in ops {
        match o {
            Op::Write(off, len, seed) => {
                let len = len.min((SIZE - off) as usize);
                let data = common::pattern(u64::from(seed) + 1, len);
                v.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Zero(off, len) | Op::Unmap(off, len) => {
                let len = len.min(SIZE - off);
                if matches!(o, Op::Zero(..)) {
                    v.write_zeroes(off, len).unwrap();
                } else {
                    v.unmap(off, len).unwrap();
                }
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => v.flush().unwrap(),
            Op::Reopen => {
                v.close().unwrap();
                v = Vhdx::open(&img, OpenOptions { read_only: false }).unwrap();
            }
        }
    }
    assert_eq!(common::fnv(&common::read_all(&v)), common::fnv(&model));
    v.close().unwrap();
    let r = vhdx::check(&img, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
    /// Dynamic (512 and 4096-byte sectors) and differencing images read back what
    /// a byte-array model holds after any sequence of writes, zeroes, unmaps,
    /// flushes and reopens, and pass check.
    #[test]
    fn matches_model(kind in 0u8..3, ops in proptest::collection::vec(op(), 1..25)) {
        run_ops(kind, ops);
    }
}
