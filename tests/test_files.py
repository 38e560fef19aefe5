"""File pseudonyms and the local file map (`cbir.store.files`): real SQLite, real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbir.app.settings import Settings
from cbir.errors import CbirError
from cbir.io.phi import Pseudonymizer
from cbir.store.files import FileMap, LocalFiles
from cbir.store.record import CollectionRecord
from cbir.store.schema import point_id

KEY = Pseudonymizer(b"k" * 32)


def test_file_pseudonyms_are_keyed_and_distinct_from_patient_pseudonyms() -> None:
    name = "stage_2_train_images/DOE^JANE_MRN1234567.dcm"
    file = KEY.file("rsna", name)
    assert file == KEY.file("rsna", name) and file.startswith("f-") and len(file) == 26
    assert file != KEY.file("nih", name) != Pseudonymizer(b"o" * 32).file("rsna", name)
    assert "MRN1234567" not in file and file[2:] not in KEY(name)
    assert KEY.file("rsna", "caf\udce9.png").startswith("f-")               # an undecodable name works too
    # point IDs of non-DICOM files derive from the pseudonym, so a guessed MRN does not give the ID
    assert point_id("rsna", None, name, file) != point_id("rsna", None, name)
    assert point_id("rsna", "uid-key", name, file) == point_id("rsna", "uid-key", name)   # DICOMs: by UID


def test_the_map_resolves_what_this_machine_ingested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_STATE_DIR", str(tmp_path / "state"))
    state = Settings.from_env().state_dir
    assert state == tmp_path / "state"
    reader = FileMap.local(state)                       # no map yet: finds nothing, creates nothing
    assert reader.relpath("f-x") is None and not (tmp_path / "state").exists()
    with FileMap.local(state, writable=True) as writer:
        writer.add([("f-a", "rsna", "a/DOE.dcm"), ("f-b", "rsna", "b.dcm")])
        writer.add([("f-a", "rsna", "changed.dcm")])                       # a known pseudonym keeps its row
    assert (tmp_path / "state" / "files.sqlite").stat().st_mode & 0o777 == 0o600
    assert reader.relpath("f-a") == "a/DOE.dcm" and reader.relpath("f-z") is None   # the reader sees it now
    with pytest.raises(CbirError, match="opened read-only"):
        reader.add([("f-c", "rsna", "c.dcm")])
    reader.close()


def test_local_files_reads_both_payload_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "x.dcm").write_bytes(b"x")
    record = CollectionRecord.of({"roots": {"rsna": [str(tmp_path / "root")]}}, "c")
    state = Settings.from_env().state_dir
    with FileMap.local(state, writable=True) as writer:
        writer.add([("f-x", "rsna", "a/x.dcm"), ("f-out", "rsna", "../outside.dcm")])
    with FileMap.local(state) as file_map:
        files = LocalFiles(record, file_map)
        assert files.find({"dataset": "rsna", "path": None, "file": "f-x"}) == tmp_path / "root" / "a" / "x.dcm"
        assert files.find({"dataset": "rsna", "path": "a/x.dcm"}) == tmp_path / "root" / "a" / "x.dcm"  # plain
        assert files.find({"dataset": "rsna", "path": None, "file": "f-unknown"}) is None
        assert files.find({"dataset": "rsna", "file": "f-out"}) is None          # never outside the roots
    assert LocalFiles(record).relpath({"file": "f-x"}) is None                    # without a map: no path


def test_an_unwritable_state_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("CBIR_STATE_DIR", str(tmp_path / "file" / "state"))
    with pytest.raises(CbirError, match=r"cannot write the local file map .*set \$CBIR_STATE_DIR"):
        FileMap.local(Settings.from_env().state_dir, writable=True)


def test_dicom_point_ids_are_keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point IDs were uuid5(dataset:sha256(SOPInstanceUID)): whoever held a study's UIDs could test whether it was
    in a shared index or a snapshot. Now they come from the keyed instance key: another key, other IDs. A
    collection made before is refused, naming the reindex that keys it."""
    import hashlib
    import uuid

    from cbir.app.ingest import ingest_records
    from cbir.data.layout import load_dataset
    from cbir.data.synth import synth_dataset
    from cbir.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
    from cbir.store import open_index
    from cbir.store.schema import POINT_NAMESPACE
    synth_dataset("rsna", 6, 32, tmp_path / "data", seed=2)
    records = load_dataset(tmp_path / "data", "rsna")
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32)),
                    tmp_path / "model")
    loaded = load_checkpoint(tmp_path / "model")
    monkeypatch.setenv("CBIR_STATE_DIR", str(tmp_path / "state"))

    def ids(index_name: str, key: bytes) -> set[str]:
        with open_index(str(tmp_path / index_name), writable=True, create=True) as index:
            ingest_records(records, loaded, index, "c", Pseudonymizer(key), workers=0)
            return {p.id for p in index.scroll("c")}

    first, again, other = ids("a", b"k" * 32), ids("b", b"k" * 32), ids("c", b"x" * 32)
    assert len(first) == 6 and first == again and not first & other
    import pydicom
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in records.meta["path"]]
    plain = {str(uuid.uuid5(POINT_NAMESPACE, f"{records.dataset_id}:uid:{hashlib.sha256(u.encode()).hexdigest()[:32]}"))
             for u in uids}
    assert not plain & first                         # the UIDs alone no longer give the IDs
    import cbir.app.ingest as ingest_module  # a collection made before keyed IDs: no `point_ids`
    made = ingest_module.collection_meta
    monkeypatch.setattr(ingest_module, "collection_meta",
                        lambda *args: {k: v for k, v in made(*args).items() if k != "point_ids"})
    assert ids("old", b"k" * 32) == plain
    monkeypatch.setattr(ingest_module, "collection_meta", made)
    with open_index(str(tmp_path / "old"), writable=True) as index:   # refused, naming the command that keys it
        with pytest.raises(CbirError, match="key them first with `cbir ingest --reindex`"):
            ingest_records(records, loaded, index, "c", Pseudonymizer(b"k" * 32), workers=0)
        assert {p.id for p in index.scroll("c")} == plain                    # nothing was written
        ingest_records(records, loaded, index, "c", Pseudonymizer(b"k" * 32), workers=0, reindex=True)
        assert {p.id for p in index.scroll("c")} == first and index.record("c").keyed_point_ids
