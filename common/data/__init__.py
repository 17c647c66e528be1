"""Hospital data: DICOM decoding, ROI cutting, the ROI store, patient splits, synthetic hospitals."""
