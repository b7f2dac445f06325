//! Datapath tier: the pinned Maglev tables through [`MaglevTables`], in a scratch bpffs with the
//! real datapath loaded. Needs root (it loads programs and creates maps in the kernel).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests: a failure should stop the test with its context"
)]

use std::path::Path;

use aya::maps::{Array, HashOfMaps, Map, MapData};
use ferrox_abi::MAGLEV_TABLE_SIZE;
use ferrox_datapath::{
    Datapath, DatapathError, MaglevTables, WriteError, bpffs::ScratchBpffs, table_digest,
};

const M: usize = MAGLEV_TABLE_SIZE as usize;

/// A full-size table cycling through `ids`, starting at `ids[shift % len]`.
fn table(ids: &[u32], shift: usize) -> Vec<u32> {
    (0..M).map(|i| ids[(i + shift) % ids.len()]).collect()
}

fn scratch() -> ScratchBpffs {
    ScratchBpffs::new(Path::new("/run"), "ferrox-maglev-test").unwrap()
}

/// What a packet in flight holds: the inner array the outer map named at lookup time.
fn held_inner(layout: &ferrox_datapath::PinLayout, rev_nat_id: u32) -> MapData {
    let outer = Map::from_map_data(MapData::from_pin(layout.map("MAGLEV_V1")).unwrap()).unwrap();
    let outer: HashOfMaps<MapData, u32, MapData> = HashOfMaps::try_from(outer).unwrap();
    outer.get(&rev_nat_id, 0).unwrap()
}

fn read_all(inner: &MapData) -> Vec<u32> {
    let map = Map::from_map_data(MapData::from_id(inner.info().unwrap().id()).unwrap()).unwrap();
    let array: Array<MapData, u32> = Array::try_from(map).unwrap();
    array.iter().map(Result::unwrap).collect()
}

#[test]
fn tables_round_trip_are_replaced_whole_and_removed() {
    let bpffs = scratch();
    let layout = bpffs.layout();
    let _dp = Datapath::open(&layout).unwrap();
    let mut tables = MaglevTables::open(&layout).unwrap();
    assert!(tables.ids().unwrap().is_empty());
    assert_eq!(tables.get(7).unwrap(), None);

    let a = table(&[1, 2, 3], 0);
    let b = table(&[4, 5], 1);
    tables.set(7, &a).unwrap();
    tables.set(300, &b).unwrap();
    assert_eq!(tables.get(7).unwrap().as_deref(), Some(&a[..]));
    assert_eq!(tables.get(300).unwrap().as_deref(), Some(&b[..]));
    assert_eq!(tables.ids().unwrap(), [7, 300]);
    assert_eq!(
        tables.digests().unwrap(),
        [(7, Some(table_digest(&a))), (300, Some(table_digest(&b)))]
    );

    // Replacing swaps in a new inner array: the one a reader already holds is never written,
    // so it sees the whole old table, and the next lookup the whole new one.
    let held = held_inner(&layout, 7);
    let c = table(&[9, 8, 7, 6], 2);
    tables.set(7, &c).unwrap();
    assert_eq!(read_all(&held), a, "the old table was edited in place");
    assert_ne!(
        held_inner(&layout, 7).info().unwrap().id(),
        held.info().unwrap().id()
    );
    assert_eq!(tables.get(7).unwrap().as_deref(), Some(&c[..]));
    assert_eq!(tables.digest(7).unwrap(), Some(Some(table_digest(&c))));
    assert_eq!(tables.get(300).unwrap().as_deref(), Some(&b[..]));

    assert!(tables.remove(7).unwrap());
    assert!(!tables.remove(7).unwrap());
    assert_eq!(tables.get(7).unwrap(), None);
    assert_eq!(tables.digest(7).unwrap(), None);
    assert_eq!(tables.ids().unwrap(), [300]);
}

#[test]
fn a_table_of_the_wrong_length_is_refused_and_the_old_one_stays() {
    let bpffs = scratch();
    let layout = bpffs.layout();
    let _dp = Datapath::open(&layout).unwrap();
    let mut tables = MaglevTables::open(&layout).unwrap();
    let good = table(&[1, 2], 0);
    tables.set(1, &good).unwrap();
    for len in [0, 1, M - 1, M + 1] {
        let err = tables.set(1, &vec![3; len]).unwrap_err();
        let WriteError::Other(e @ DatapathError::Map { name, .. }) = &err else {
            panic!("length {len}: {err:?}");
        };
        assert_eq!(*name, "MAGLEV_V1");
        let text = format!("{e}: {}", std::error::Error::source(e).unwrap());
        assert!(text.contains("wrong length"), "{text}");
        assert!(text.contains(&(M * 4).to_string()), "{text}");
        assert!(tables.set(2, &vec![3; len]).is_err());
    }
    assert_eq!(tables.get(1).unwrap().as_deref(), Some(&good[..]));
    assert_eq!(tables.ids().unwrap(), [1]);
}

#[test]
fn tables_survive_a_second_open_of_the_same_pins() {
    let bpffs = scratch();
    let layout = bpffs.layout();
    let a = table(&[11, 12, 13], 0);
    let b = table(&[21], 0);
    let outer_id = {
        let _dp = Datapath::open(&layout).unwrap();
        let mut tables = MaglevTables::open(&layout).unwrap();
        tables.set(1, &a).unwrap();
        tables.set(65535, &b).unwrap();
        tables.id()
    };
    // The agent restarts: the datapath is re-adopted from its pins.
    let _dp = Datapath::open(&layout).unwrap();
    let mut tables = MaglevTables::open(&layout).unwrap();
    assert_eq!(tables.id(), outer_id, "the pinned map was re-adopted");
    assert_eq!(tables.ids().unwrap(), [1, 65535]);
    assert_eq!(tables.get(1).unwrap().as_deref(), Some(&a[..]));
    assert_eq!(tables.get(65535).unwrap().as_deref(), Some(&b[..]));
    assert_eq!(
        tables.digests().unwrap(),
        [(1, Some(table_digest(&a))), (65535, Some(table_digest(&b)))]
    );
    // And it can still be written.
    tables.set(1, &b).unwrap();
    assert_eq!(tables.get(1).unwrap().as_deref(), Some(&b[..]));
}

#[test]
fn opening_without_a_loaded_datapath_names_the_missing_map() {
    let bpffs = scratch();
    let err = match MaglevTables::open(&bpffs.layout()) {
        Ok(_) => panic!("opened a map that was never pinned"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("MAGLEV_V1"), "{err}");
}

/// Identical tables are one array: the second frontend with the same table gets the first's
/// array (also after a restart, found by its name), a replaced or removed frontend leaves the
/// others' tables as they were, and `usage` counts frontends, arrays and their memory.
#[test]
fn identical_tables_share_one_array_and_are_counted() {
    let bpffs = scratch();
    let layout = bpffs.layout();
    let _dp = Datapath::open(&layout).unwrap();
    let mut tables = MaglevTables::open(&layout).unwrap();
    let a = table(&[1, 2, 3], 0);
    let b = table(&[4, 5], 0);
    let id = |rev: u32| held_inner(&layout, rev).info().unwrap().id();

    tables.set(1, &a).unwrap();
    tables.set(2, &a).unwrap();
    tables.set(3, &b).unwrap();
    assert_eq!(id(1), id(2), "identical tables share an array");
    assert_ne!(id(1), id(3));
    let usage = tables.usage().unwrap();
    assert_eq!((usage.frontends, usage.tables), (3, 2));
    // The kernel keeps array values in 8-byte slots: ~128 KiB per table.
    let per_table = u64::from(MAGLEV_TABLE_SIZE) * 8;
    assert!(
        usage.bytes >= 2 * per_table && usage.bytes <= 2 * (per_table + 4096),
        "{usage:?}"
    );

    // Frontend 1 gets another table: frontend 2 keeps its own, whole.
    tables.set(1, &b).unwrap();
    assert_eq!(id(1), id(3));
    assert_eq!(tables.get(2).unwrap().as_deref(), Some(&a[..]));
    assert_eq!(
        (
            tables.usage().unwrap().frontends,
            tables.usage().unwrap().tables
        ),
        (3, 2)
    );

    // A restarted agent finds the arrays by their names.
    drop(tables);
    let mut tables = MaglevTables::open(&layout).unwrap();
    tables.set(4, &a).unwrap();
    assert_eq!(id(4), id(2));
    // Once no frontend uses an array it is freed; the same table later gets a new one.
    tables.remove(2).unwrap();
    tables.remove(4).unwrap();
    assert_eq!(tables.usage().unwrap().tables, 1);
    tables.set(5, &a).unwrap();
    assert_eq!(tables.get(5).unwrap().as_deref(), Some(&a[..]));
    assert_eq!(tables.usage().unwrap().tables, 2);
}
