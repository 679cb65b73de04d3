"""De-identification of stored DICOM: the PS3.15 Annex E Basic Application Level Confidentiality Profile.

`store_images` keeps uploads in the results store; a DICOM upload is kept de-identified (unless
`store_identifiable_images` is set), so the store never becomes a second, unguarded copy of patient data.

What `deidentify_dataset` does, with pydicom, to the dataset and every sequence item in it:
- the attributes of Table E.1-1 (DICOM 2024b, the Basic Profile column; the keyword lists below) are removed
  (X, X/Z, X/D, X/Z/D) or emptied (Z, Z/D, and D: an empty value stands in for the dummy), which covers the
  patient's names, IDs, birth date, addresses, the accession number and study ID, visit and admission data,
  institution and department, physicians and operators, station names, device serial numbers, descriptions
  and free-text comments; curve data (50xx) and overlay planes (60xx) go too;
- every person name (PN), date (DA), time (TM) and date-time (DT) left anywhere is emptied: the profile
  removes or empties nearly all of them, and one it does not list is no safer
  (LongitudinalTemporalInformationModified = REMOVED says so);
- the UIDs of the U rows (study, series, SOP instance, frame of reference, referenced instances, ...) are
  replaced by `generate_uid(entropy_srcs=[original])`: the same source UID always maps to the same new one,
  so the images of one study stay one study, across uploads and restarts; class and transfer syntax UIDs stay;
- private tags are removed; PatientIdentityRemoved = YES, DeidentificationMethod and the
  De-identification Method Code Sequence (113100, DCM, "Basic Application Confidentiality Profile") are set.
Pixel data are untouched: text burned into the pixels (BurnedInAnnotation) is not removed (the profile's
Clean Pixel Data option is not applied), nor are the file's transfer syntax and pixel encoding changed.

Why our own module rather than a library: `deid` (pydicom org) pulls matplotlib and a recipe engine whose
default recipe is not this profile; `dicognito` pseudonymises (plausible fake names, shifted dates) and keeps
private tags; `dicom-anonymizer` has the profile's table but keeps a process-wide, ever-growing dictionary of
random UIDs (no mapping stable across restarts), prints from library code, fails on some VRs (OB in a D row)
and sets none of the identity-removed attributes. The table is data; the rules here fit in a page.
"""

from __future__ import annotations

import io
import logging
from typing import Any

log = logging.getLogger(__name__)

METHOD = "DICOM PS3.15 Annex E Basic Profile (bone-fracture-detection)"  # LO: at most 64 characters
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

# PS3.15 Table E.1-1, Basic Profile column, by action (keywords as pydicom spells them).
_REMOVE = """
    AcquisitionComments AcquisitionContextSequence AcquisitionDate AcquisitionDateTime
    AcquisitionDeviceProcessingDescription AcquisitionProtocolDescription AcquisitionTime
    ActualHumanPerformersSequence AdditionalPatientHistory AddressTrial AdmissionID AdmittingDate
    AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription AdmittingTime AffectedSOPInstanceUID Allergies
    AnnotationGroupDescription ApprovalStatusDateTime Arbitrary AssertionExpirationDateTime
    AuthorObserverSequence BarcodeValue BeamDescription BolusDescription BranchOfService CalibrationDate
    CalibrationTime CameraOwnerName CassetteID CertifiedTimestamp
    ClinicalTrialProtocolEthicsCommitteeApprovalNumber ClinicalTrialSeriesDescription ClinicalTrialSeriesID
    ClinicalTrialTimePointDescription CommentsOnRadiationDose CommentsOnThePerformedProcedureStep
    CompensatorDescription ConfidentialityConstraintOnPatientDataDescription
    ConsultingPhysicianIdentificationSequence ContainerComponentID ContainerDescription
    ContentCreatorIdentificationCodeSequence ContrastBolusStartTime ContrastBolusStopTime ContributionDateTime
    ContributionDescription CountryOfResidence CreationDate CreationTime CurrentObserverTrial
    CurrentPatientLocation CurveDate CurveTime CustodialOrganizationSequence DataSetTrailingPadding
    DateOfDocumentOrVerbalTransactionTrial DateOfInstallation DateOfLastCalibration
    DateOfLastDetectorCalibration DateOfManufacture DateOfSecondaryCapture DateTimeOfLastCalibration
    DecompositionDescription DerivationDescription DetectorID DeviceDescription DeviceSerialNumber
    DeviceSettingDescription DigitalSignaturesSequence DischargeDate DischargeDiagnosisDescription DischargeTime
    DisplacementReferenceLabel DistributionAddress DistributionName DoseReferenceDescription
    EndAcquisitionDateTime EntityDescription EntityName EquipmentFrameOfReferenceDescription
    EthicsCommitteeApprovalEffectivenessEndDate EthicsCommitteeApprovalEffectivenessStartDate EthnicGroup
    ExpectedCompletionDateTime FilterLookupTableDescription FindingsGroupRecordingDateTrial
    FindingsGroupRecordingTimeTrial FirstTreatmentDate FixationDeviceDescription FractionGroupDescription
    FrameComments GPSAltitude GPSAltitudeRef GPSAreaInformation GPSDOP GPSDateStamp GPSDestBearing
    GPSDestBearingRef GPSDestDistance GPSDestDistanceRef GPSDestLatitude GPSDestLatitudeRef GPSDestLongitude
    GPSDestLongitudeRef GPSDifferential GPSImgDirection GPSImgDirectionRef GPSLatitude GPSLatitudeRef
    GPSLongitude GPSLongitudeRef GPSMapDatum GPSMeasureMode GPSProcessingMethod GPSSatellites GPSSpeed
    GPSSpeedRef GPSStatus GPSTimeStamp GPSTrack GPSTrackRef GPSVersionID GantryID GeneratorID
    HL7DocumentEffectiveTime HumanPerformerName HumanPerformerOrganization IconImageSequence IdentifyingComments
    ImageComments ImagePresentationComments ImagingServiceRequestComments Impressions InstanceCoercionDateTime
    InstanceCreationDate InstanceCreationTime InstanceOriginStatus InstitutionAddress InstitutionCodeSequence
    InstitutionName InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence
    InsurancePlanIdentification IntendedFractionStartTime IntendedPhaseEndDate IntendedPhaseStartDate
    IntendedRecipientsOfResultsIdentificationSequence InterpretationApprovalDate InterpretationApprovalTime
    InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription InterpretationID
    InterpretationIDIssuer InterpretationRecordedDate InterpretationRecordedTime InterpretationRecorder
    InterpretationText InterpretationTranscriber InterpretationTranscriptionDate InterpretationTranscriptionTime
    InterventionDrugStartTime InterventionDrugStopTime IssueDateOfImagingServiceRequest
    IssueTimeOfImagingServiceRequest IssuerOfAdmissionID IssuerOfAdmissionIDSequence
    IssuerOfClinicalTrialProtocolID IssuerOfClinicalTrialSeriesID IssuerOfClinicalTrialSiteID
    IssuerOfClinicalTrialSubjectID IssuerOfClinicalTrialSubjectReadingID IssuerOfClinicalTrialTimePointID
    IssuerOfPatientID IssuerOfServiceEpisodeID IssuerOfServiceEpisodeIDSequence LabelText LastMenstrualDate
    LensMake LensModel LensSerialNumber LensSpecification LongDeviceDescription MAC MakerNote MedicalAlerts
    MedicalRecordLocator MilitaryRank ModifiedAttributesSequence ModifiedImageDate ModifiedImageDescription
    ModifiedImageTime ModifyingDeviceID MostRecentTreatmentDate MultienergyAcquisitionDescription
    NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults NetworkID NonconformingDataElementValue
    NonconformingModifiedAttributesSequence ObservationDateTime ObservationDateTrial ObservationStartDateTime
    ObservationTimeTrial Occupation OperatorIdentificationSequence OperatorsName OrderCallbackPhoneNumber
    OrderCallbackTelecomInformation OrderEnteredBy OrderEntererLocation OriginalAttributesSequence Originator
    OtherClinicalTrialProtocolIDsSequence OtherPatientIDs OtherPatientIDsSequence OtherPatientNames OverlayDate
    OverlayTime ParticipantSequence PatientAddress PatientAge PatientBirthName PatientBirthTime PatientComments
    PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName
    PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence PatientReligiousPreference
    PatientSetupPhotoDescription PatientSexNeutered PatientSize PatientState PatientTelecomInformation
    PatientTelephoneNumbers PatientTransportArrangements PatientTreatmentPreparationMethodDescription
    PatientTreatmentPreparationProcedureParameterDescription PatientWeight PerformedLocation
    PerformedProcedureStepDescription PerformedProcedureStepEndDate PerformedProcedureStepEndDateTime
    PerformedProcedureStepEndTime PerformedProcedureStepID PerformedProcedureStepStartDate
    PerformedProcedureStepStartDateTime PerformedProcedureStepStartTime PerformedStationAETitle
    PerformedStationGeographicLocationCodeSequence PerformedStationName PerformedStationNameCodeSequence
    PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress PersonTelecomInformation
    PersonTelephoneNumbers PhysicianApprovingInterpretation PhysiciansOfRecord
    PhysiciansOfRecordIdentificationSequence PhysiciansReadingStudyIdentificationSequence PlateID
    PositionAcquisitionTemplateDescription PositionAcquisitionTemplateName PreMedication PregnancyStatus
    PrescriptionDescription PresentationCreationDate PresentationCreationTime PriorTreatmentDoseDescription
    ProcedureStepCancellationDateTime ProductExpirationDateTime ProtocolName PyramidDescription PyramidLabel
    ROICreatorSequence ROIDateTime ROIDescription ROIGenerationDescription ROIInterpreterSequence
    ROIObservationDateTime ROIObservationDescription ROIObservationLabel RTPlanDate RTPlanDescription RTPlanName
    RTPlanTime RTTreatmentApproachLabel RadiopharmaceuticalStartDateTime RadiopharmaceuticalStartTime
    RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime ReasonForOmissionDescription
    ReasonForRequestedProcedureCodeSequence ReasonForStudy ReasonForTheImagingServiceRequest
    ReasonForTheRequestedProcedure ReasonForVisit ReasonForVisitCodeSequence ReceivingAE
    ReferencedDigitalSignatureSequence ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
    ReferencedPatientSequence ReferencedPerformedProcedureStepSequence ReferencedSOPInstanceMACSequence
    ReferencedStudySequence ReferringPhysicianAddress ReferringPhysicianIdentificationSequence
    ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence RequestedContrastAgent
    RequestedProcedureComments RequestedProcedureDescription RequestedProcedureID RequestedProcedureLocation
    RequestedSeriesDescription RequestingAE RequestingPhysician RequestingService
    RespiratoryMotionCompensationTechniqueDescription ResponsibleOrganization ResponsiblePerson ResultsComments
    ResultsDistributionListSequence ResultsID ResultsIDIssuer RetrieveAETitle ReviewerName
    SOPAuthorizationDateTime ScheduledAdmissionDate ScheduledAdmissionTime ScheduledDischargeDate
    ScheduledDischargeTime ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
    ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
    ScheduledProcedureStepDescription ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
    ScheduledProcedureStepExpirationDateTime ScheduledProcedureStepID ScheduledProcedureStepLocation
    ScheduledProcedureStepModificationDateTime ScheduledProcedureStepStartDate
    ScheduledProcedureStepStartDateTime ScheduledProcedureStepStartTime ScheduledStationAETitle
    ScheduledStationGeographicLocationCodeSequence ScheduledStationName ScheduledStationNameCodeSequence
    ScheduledStudyLocation ScheduledStudyLocationAETitle ScheduledStudyStartDate ScheduledStudyStartTime
    ScheduledStudyStopDate ScheduledStudyStopTime SeriesDate SeriesDescription SeriesTime
    ServiceEpisodeDescription ServiceEpisodeID SetupTechniqueDescription ShieldingDeviceDescription
    SlideIdentifier SmokingStatus SourceManufacturer SourceSerialNumber SpecialNeeds SpecimenAccessionNumber
    SpecimenDetailedDescription SpecimenShortDescription StartAcquisitionDateTime StationAETitle StationName
    StructureSetDescription StructureSetName StudyArrivalDate StudyArrivalTime StudyComments StudyCompletionDate
    StudyCompletionTime StudyDescription StudyIDIssuer StudyReadDate StudyReadTime StudyVerifiedDate
    StudyVerifiedTime SubstanceAdministrationDateTime TelephoneNumberTrial TemplateLocalVersion TemplateVersion
    TextComments TextString TimeOfDocumentCreationOrVerbalTransactionTrial TimeOfLastCalibration
    TimeOfLastDetectorCalibration TimeOfSecondaryCapture TimezoneOffsetFromUTC TopicAuthor TopicKeywords
    TopicSubject TopicTitle TransducerIdentificationSequence TreatmentDate TreatmentMachineName TreatmentSite
    TreatmentSites TreatmentTime UDISequence UniqueDeviceIdentifier VerbalSourceIdentifierCodeSequenceTrial
    VerbalSourceTrial VisitComments WaveformFilterDescription XRayDetectorLabel
"""
_EMPTY = """
    AccessionNumber AcquisitionFieldOfViewLabel AnnotationGroupLabel AnnotationGroupUID AssertionDateTime
    AttributeModificationDateTime BeamHoldTransitionDateTime CalibrationDateTime CertificateOfSigner
    ClinicalTrialCoordinatingCenterName ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolID
    ClinicalTrialProtocolName ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialSponsorName
    ClinicalTrialSubjectID ClinicalTrialSubjectReadingID ClinicalTrialTimePointID
    ConceptualVolumeCombinationDescription ConceptualVolumeDescription ConsultingPhysicianName
    ContainerIdentifier ContentCreatorName ContentDate ContentSequence ContentTime ContextGroupLocalVersion
    ContextGroupVersion ContrastBolusAgent Date DateTime DecayCorrectionDateTime DestinationAE
    DeviceAlternateIdentifier DeviceLabel DigitalSignatureDateTime EffectiveDateTime EncapsulatedDocument
    EntityLabel EntityLongLabel ExclusionStartDateTime FillerOrderNumberImagingServiceRequest FlowIdentifier
    FlowIdentifierSequence FractionationNotes FrameAcquisitionDateTime FrameOriginTimestamp
    FrameReferenceDateTime FunctionalSyncPulse GraphicAnnotationSequence HangingProtocolCreationDateTime
    ImpedanceMeasurementDateTime InformationIssueDateTime InstructionPerformedDateTime InterlockDateTime
    InterlockDescription InterlockOriginDescription IssuerOfTheContainerIdentifierSequence
    IssuerOfTheSpecimenIdentifierSequence ManufacturerDeviceIdentifier ModifyingSystem OverrideDateTime
    ParticipationDateTime PatientBirthDate PatientID PatientName PatientSex PersonIdentificationCodeSequence
    PersonName PlacerOrderNumberImagingServiceRequest PrescriptionNotes PrescriptionNotesSequence ROIInterpreter
    ROIName RTAccessoryDeviceSlotID RTAccessoryHolderSlotID RTPhysicianIntentNarrative RTPlanLabel
    RTPrescriptionLabel RTToleranceSetLabel RadiationDoseIdentificationLabel RadiationDoseInVivoMeasurementLabel
    RadiationGenerationModeDescription RadiationGenerationModeLabel ReasonForSuperseding
    ReasonForTheAttributeModification RecordedRTControlPointDateTime ReferencedDateTime ReferringPhysicianName
    ReviewDate ReviewTime SafePositionExitDate SafePositionExitTime SafePositionReturnDate
    SafePositionReturnTime SelectorAEValue SelectorASValue SelectorDAValue SelectorDTValue SelectorLOValue
    SelectorLTValue SelectorOBValue SelectorPNValue SelectorSHValue SelectorSTValue SelectorTMValue
    SelectorUNValue SelectorURValue SelectorUTValue SourceEndDateTime SourceIdentifier SourceOfPreviousValues
    SourceStartDateTime SourceStrengthReferenceDate SourceStrengthReferenceTime SpecimenIdentifier
    SpecimenPreparationSequence StructureSetDate StructureSetLabel StructureSetTime StudyDate StudyID StudyTime
    Time TreatmentControlPointDate TreatmentControlPointTime TreatmentPositionGroupLabel TreatmentTechniqueNotes
    TreatmentToleranceViolationDateTime TreatmentToleranceViolationDescription UserContentLabel
    UserContentLongLabel VerificationDateTime VerifyingObserverIdentificationCodeSequence VerifyingObserverName
    VerifyingObserverSequence VerifyingOrganization XRayDetectorID XRaySourceID
"""
_REPLACE_UID = """
    AcquisitionUID ConcatenationUID ConceptualVolumeUID ConstituentConceptualVolumeUID DeviceUID
    DigitalSignatureUID DimensionOrganizationUID DoseReferenceUID DosimetricObjectiveUID
    FailedSOPInstanceUIDList FiducialUID FrameOfReferenceUID InstanceCreatorUID IrradiationEventUID
    LargePaletteColorLookupTableUID ManufacturerDeviceClassUID MediaStorageSOPInstanceUID MultiplexGroupUID
    ObservationSubjectUIDTrial ObservationUID PaletteColorLookupTableUID PatientSetupUID
    PresentationDisplayCollectionUID PresentationSequenceCollectionUID PyramidUID RTTreatmentPhaseUID
    ReferencedConceptualVolumeUID ReferencedDoseReferenceUID ReferencedDosimetricObjectiveUID
    ReferencedFiducialsUID ReferencedFrameOfReferenceUID
    ReferencedGeneralPurposeScheduledProcedureStepTransactionUID ReferencedObservationUIDTrial
    ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile ReferencedTreatmentPositionGroupUID
    RelatedFrameOfReferenceUID RequestedSOPInstanceUID SOPInstanceUID SeriesInstanceUID
    SourceConceptualVolumeUID SourceFrameOfReferenceUID SpecimenUID StorageMediaFileSetUID StudyInstanceUID
    SynchronizationFrameOfReferenceUID TargetUID TemplateExtensionCreatorUID TemplateExtensionOrganizationUID
    TrackingUID TransactionUID TreatmentPositionGroupUID TreatmentSessionUID UID
"""
# X/Z/U*: kept, with the UIDs inside them replaced (the U rows apply in every sequence item).
_KEEP_CLEANED = "ReferencedImageSequence SourceImageSequence"
# Group 0002 (the file meta) says who sent the file from where.
_META_REMOVE = """
    SourceApplicationEntityTitle SendingApplicationEntityTitle ReceivingApplicationEntityTitle
    SourcePresentationAddress SendingPresentationAddress ReceivingPresentationAddress
    PrivateInformationCreatorUID PrivateInformation
"""
_DATES_AND_NAMES = frozenset({"PN", "DA", "TM", "DT"})


class DeidentificationError(ValueError):
    """The DICOM file could not be de-identified (so it must not be stored); the reason holds no patient data."""


def _tags(keywords: str) -> frozenset[int]:
    from pydicom.datadict import tag_for_keyword

    tags = set()
    for keyword in keywords.split():
        tag = tag_for_keyword(keyword)
        if tag is None:  # a typo here would silently keep an identifier: fail at import instead
            raise ValueError(f"unknown DICOM keyword {keyword!r} in the de-identification table")
        tags.add(int(tag))
    return frozenset(tags)


REMOVE_TAGS = _tags(_REMOVE)
EMPTY_TAGS = _tags(_EMPTY)
REPLACE_UID_TAGS = _tags(_REPLACE_UID)
META_REMOVE_TAGS = _tags(_META_REMOVE)
_ = _tags(_KEEP_CLEANED)  # checked like the others; nothing to do with them beyond the U rows inside


def replacement_uid(uid: str) -> str:
    """The UID that replaces `uid`: always the same for the same source UID, unrelated to it otherwise."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(uid)]))


def _removed_group(tag: int) -> bool:
    group = tag >> 16
    return (group & 0xFF00) in (0x5000, 0x6000)  # curve data (50xx) and overlay planes (60xx)


def _clean(dataset: Any) -> None:
    """Apply the table and the VR rules to `dataset` and, recursively, to every sequence item in it."""
    from pydicom.dataelem import empty_value_for_VR

    for tag in list(dataset.keys()):
        if tag in REMOVE_TAGS or _removed_group(int(tag)):
            del dataset[tag]
            continue
        element = dataset[tag]
        if tag in REPLACE_UID_TAGS and element.VR == "UI":
            if element.VM > 1:
                element.value = [replacement_uid(uid) for uid in element.value]
            elif element.value:
                element.value = replacement_uid(element.value)
        elif tag in EMPTY_TAGS or element.VR in _DATES_AND_NAMES:
            element.value = empty_value_for_VR(element.VR)
        elif element.VR == "SQ":
            for item in element.value:
                _clean(item)


def deidentify_dataset(dataset: Any) -> None:
    """De-identify a pydicom Dataset in place (see the module docstring)."""
    from pydicom.dataset import Dataset

    dataset.remove_private_tags()
    _clean(dataset)
    meta = getattr(dataset, "file_meta", None)
    if meta is not None:
        for tag in META_REMOVE_TAGS & set(meta.keys()):
            del meta[tag]
        if "MediaStorageSOPInstanceUID" in meta and meta.MediaStorageSOPInstanceUID:
            meta.MediaStorageSOPInstanceUID = replacement_uid(meta.MediaStorageSOPInstanceUID)
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    dataset.DeidentificationMethodCodeSequence = [code]
    dataset.LongitudinalTemporalInformationModified = "REMOVED"


def deidentify_dicom(data: bytes) -> bytes:
    """The DICOM file `data` de-identified, in the form it came in (preamble and file meta when it had them,
    the same transfer syntax, the pixel data byte for byte); raises DeidentificationError."""
    import pydicom

    try:
        # force: uploads sent as application/dicom may lack the preamble (the predictor parsed them the same way)
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
        deidentify_dataset(dataset)
        buffer = io.BytesIO()
        dataset.save_as(buffer)
    except Exception as error:  # pydicom raises many types; their messages may quote values, so none is kept
        raise DeidentificationError(
            f"the DICOM file could not be de-identified ({type(error).__name__} while reading or writing it)"
        ) from None
    return buffer.getvalue()
