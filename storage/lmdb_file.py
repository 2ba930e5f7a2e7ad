"""Reading an LMDB environment's own header, without LMDB.

LMDB maps ``data.mdb`` into memory and trusts it: a file shorter than its
header says is a SIGBUS at the first read past its end (the process dies with
no message), and garbage where a meta page was is an ``MDB_INVALID`` deep in
``lmdb.open``. So before LMDB sees the file, ``inspect_data_file`` reads the
two meta pages itself and checks what can be checked from the outside:

* each meta page has the ``P_META`` flag, LMDB's magic and data version, a
  sane page size and main-database root;
* the newest meta page (the higher transaction id, as LMDB picks it) says the
  environment uses pages ``0..last_pg``: they must all be in the file.

The layout (LMDB 0.9, 64-bit, ``mdb.c``): a page starts with a 16-byte header
(``pgno: u64, pad: u16, flags: u16, lower/upper: u16 u16``); a meta page's
``MDB_meta`` follows it::

    magic u32 | version u32 | address u64 | mapsize u64 |
    dbs[2] (FREE, MAIN) of 48 bytes: pad u32 flags u16 depth u16
        branch_pages u64 leaf_pages u64 overflow_pages u64 entries u64 root u64 |
    last_pg u64 | txnid u64

The page size is kept in ``dbs[FREE].pad``; meta page 1 starts at that offset.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import msgspec

from triogate.errors import StoreDamaged, StoreUnavailable

__all__ = ["DATA_FILE", "LmdbHeader", "MetaPage", "inspect_data_file"]

DATA_FILE = "data.mdb"
MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
P_META = 0x08
P_INVALID = 0xFFFF_FFFF_FFFF_FFFF
PAGE_HEADER = 16
META_SIZE = 136  # up to and including txnid
_RESTORE = "; restore the store from a backup"
_META = struct.Struct("<IIQQ48s48sQQ")
_DB = struct.Struct("<IHHQQQQQ")


class MetaPage(msgspec.Struct, frozen=True):
    index: int
    page_size: int
    map_size: int
    last_page: int
    txnid: int
    main_root: int
    entries: int  # named sub-databases in the main database


class LmdbHeader(msgspec.Struct, frozen=True):
    """What the file says about itself, and what the file is."""

    path: str
    file_size: int
    page_size: int
    current: MetaPage  # the meta page LMDB will use

    @property
    def used_bytes(self) -> int:
        return (self.current.last_page + 1) * self.page_size


def _parse_meta(raw: bytes, index: int) -> MetaPage | str:
    """The meta page, or why it is not one."""
    if len(raw) < PAGE_HEADER + META_SIZE:
        return "is cut short"
    flags = struct.unpack_from("<H", raw, 10)[0]
    (magic, version, _addr, map_size, free_raw, main_raw, last_pg, txnid) = _META.unpack_from(
        raw, PAGE_HEADER
    )
    if not flags & P_META or magic != MDB_MAGIC:
        return "is not an LMDB meta page (overwritten?)"
    if version != MDB_DATA_VERSION:
        return f"has LMDB data format {version}, this LMDB reads {MDB_DATA_VERSION}"
    page_size = _DB.unpack(free_raw)[0]
    main = _DB.unpack(main_raw)
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return f"names an impossible page size {page_size}"
    if last_pg < 1 or (main[7] != P_INVALID and not 2 <= main[7] <= last_pg):
        return "names pages that cannot exist"
    return MetaPage(
        index=index,
        page_size=page_size,
        map_size=map_size,
        last_page=last_pg,
        txnid=txnid,
        main_root=main[7],
        entries=main[6],
    )


def inspect_data_file(lmdb_dir: Path) -> LmdbHeader | None:
    """The header of ``lmdb_dir/data.mdb``; None when there is no data yet
    (no file, or an empty one: LMDB would start a new environment). Raises
    ``StoreDamaged`` with one sentence when the file cannot be what LMDB
    wrote, ``StoreUnavailable`` when it cannot be read at all."""
    path = lmdb_dir / DATA_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {path}: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        first = os.pread(fd, PAGE_HEADER + META_SIZE, 0)
        meta0 = _parse_meta(first, 0)
        if isinstance(meta0, str):
            raise StoreDamaged(f"{path} is damaged: its first meta page {meta0}{_RESTORE}")
        second = os.pread(fd, PAGE_HEADER + META_SIZE, meta0.page_size)
        meta1 = _parse_meta(second, 1)
        if isinstance(meta1, str):
            raise StoreDamaged(f"{path} is damaged: its second meta page {meta1}{_RESTORE}")
    except OSError as exc:
        raise StoreUnavailable(f"cannot read {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if meta0.page_size != meta1.page_size:
        raise StoreDamaged(
            f"{path} is damaged: its two meta pages disagree on the page size{_RESTORE}"
        )
    current = max(meta0, meta1, key=lambda m: m.txnid)
    header = LmdbHeader(str(path), size, meta0.page_size, current)
    if size < header.used_bytes:
        raise StoreDamaged(
            f"{path} is truncated: its header says it holds {header.used_bytes} bytes "
            f"({current.last_page + 1} pages), the file has {size}{_RESTORE}"
        )
    return header
