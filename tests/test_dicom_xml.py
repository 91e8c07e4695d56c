"""DICOM JSON model -> PS3.19 Native DICOM Model XML and back (dicom.xml_model)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom import json_model, xml_model
from tests.samples import pydicom_sample

NS = {"n": xml_model.NAMESPACE}
SAMPLES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "reportsi.dcm",
    "waveform_ecg.dcm",
    "examples_overlay.dcm",
]


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = "ORIGINAL\\PRIMARY\\\\AXIAL"
    ds.PatientName = "Doe^John^Q^Dr^Jr=山田^太郎"
    ds.ReferringPhysicianName = "Roe^Jane\\"
    ds.PixelSpacing = [0.5, 0.25]
    ds.SliceThickness = "2.0"
    ds.Rows = 64
    ds.StudyDescription = 'A < B & "C"'
    ds.add_new(0x00090010, "LO", "ACME 1")  # a private creator and its element
    ds.add_new(0x00091001, "OB", b"\x01\x02\x03\x04")
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.CodeMeaning = "x"
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    return ds


def test_native_dicom_model_structure_and_round_trip():
    model = json_model.to_json_dict(_dataset())
    model["7FE00010"] = {"vr": "OW", "BulkDataURI": "https://gw/x/bulkdata/7FE00010"}
    text = xml_model.to_xml(model)
    root = ET.fromstring(text)
    assert root.tag == f"{{{xml_model.NAMESPACE}}}NativeDicomModel"
    attrs = {a.get("tag"): a for a in root.findall("n:DicomAttribute", NS)}
    assert list(attrs) == list(model)
    image_type = attrs["00080008"]
    assert (image_type.get("vr"), image_type.get("keyword")) == ("CS", "ImageType")
    values = [(v.get("number"), v.text) for v in image_type.findall("n:Value", NS)]
    assert values == [("1", "ORIGINAL"), ("2", "PRIMARY"), ("3", None), ("4", "AXIAL")]
    pn = attrs["00100010"].find("n:PersonName[@number='1']", NS)
    alpha = pn.find("n:Alphabetic", NS)
    assert [c.tag.split("}")[1] for c in alpha] == list(xml_model.PN_COMPONENTS)
    assert [c.text for c in alpha] == ["Doe", "John", "Q", "Dr", "Jr"]
    assert pn.findtext("n:Ideographic/n:FamilyName", namespaces=NS) == "山田"
    assert attrs["00080090"].find("n:PersonName[@number='2']", NS) is not None
    assert attrs["00091001"].get("privateCreator") == "ACME 1"
    assert attrs["00091001"].get("keyword") is None
    assert attrs["00091001"].findtext("n:InlineBinary", namespaces=NS) == "AQIDBA=="
    items = attrs["00081140"].findall("n:Item", NS)
    assert [i.get("number") for i in items] == ["1", "2"]
    uid = items[0].find("n:DicomAttribute[@tag='00081155']/n:Value", NS)
    assert uid.text == "1.2.3" and len(items[1]) == 0
    assert attrs["7FE00010"].find("n:BulkData", NS).get("uri") == model["7FE00010"]["BulkDataURI"]
    assert attrs["00081030"].findtext("n:Value", namespaces=NS) == 'A < B & "C"'
    assert attrs["00180050"].findtext("n:Value", namespaces=NS) == "2"
    assert xml_model.from_xml(text) == model


@pytest.mark.parametrize("name", SAMPLES)
def test_pydicom_samples_round_trip(name):
    model = json_model.to_json_dict(pydicom_sample(name), bulk_threshold=4096)
    text = xml_model.to_xml(model)
    assert xml_model.from_xml(text) == model
    assert len(ET.fromstring(text).findall("n:DicomAttribute", NS)) == len(model)


def test_characters_xml_cannot_carry_are_replaced_and_non_xml_is_refused():
    model = {"00081030": {"vr": "LO", "Value": ["bad\x01char"]}}
    assert xml_model.from_xml(xml_model.to_xml(model))["00081030"]["Value"] == ["bad\ufffdchar"]
    with pytest.raises(ValueError, match="not XML"):
        xml_model.from_xml("{}")
    with pytest.raises(ValueError, match="NativeDicomModel"):
        xml_model.from_xml("<other/>")
