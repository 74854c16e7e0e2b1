"""The lock IOC encodes its PVs' monitor updates itself (issue 17): byte for byte what
caproto would send, for every lock PV, its native and TIME types, any value and alarm.
"""
from __future__ import annotations

import asyncio

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from hypothesis import given, settings
from hypothesis import strategies as st

from lock_ioc import contract
from lock_ioc.ca_server import _encode, _encode_update, _wire_value
from lock_ioc.config import load
from lock_ioc.ioc import build_ioc
from lock_ioc.store import Store

TIME = ChannelType.TIME_STRING  # the offset of the TIME types


def lock_pvs(tmp_path):
    ioc = build_ioc(load(None), store=Store(tmp_path / "state.sqlite3"))
    return ioc, {name[len(ioc.prefix):]: chan for name, chan in ioc.pvdb.items()}


def caproto_bytes(chan, data_type) -> bytes:
    metadata, values = asyncio.run(chan._read(data_type))
    return _encode(data_type, len(values), metadata, values)


def values_of(suffix: str):
    spec = contract.BY_SUFFIX.get(suffix)
    kind = spec.kind if spec else "long"   # the gates
    if kind == "text":
        limit = spec.max_length
        return st.text(max_size=limit // 4)
    if kind == "enum":
        return st.sampled_from(spec.enum)
    if kind == "double":
        return st.floats(allow_nan=False, width=64)
    return st.integers(-2**31, 2**31 - 1)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_lock_pv_encodes_as_caproto_does(tmp_path_factory, data):
    ioc, pvs = lock_pvs(tmp_path_factory.mktemp("encode"))
    try:
        for suffix, chan in sorted(pvs.items()):
            wire = _wire_value(chan)
            if chan.data_type == ChannelType.CHAR and not isinstance(chan.value, str):
                assert wire is None   # command PVs hold bytes: caproto's path
                continue
            value = data.draw(values_of(suffix), label=suffix)
            status = data.draw(st.sampled_from(list(AlarmStatus)[:4]))
            severity = data.draw(st.sampled_from(list(AlarmSeverity)))
            asyncio.run(chan.write(value, verify_value=False, timestamp=1.7e9 + 0.123456,
                                   status=status, severity=severity))
            wire = _wire_value(chan)
            assert wire is not None, suffix
            for data_type in (chan.data_type, ChannelType(chan.data_type + TIME)):
                assert _encode_update(chan, data_type, *wire) == \
                    caproto_bytes(chan, data_type), (suffix, data_type, value)
            for other in (ChannelType.STRING, ChannelType.TIME_STRING,
                          ChannelType(chan.data_type + ChannelType.CTRL_STRING)):
                assert _encode_update(chan, other, *wire) is None   # caproto's path
    finally:
        ioc.store.close()
