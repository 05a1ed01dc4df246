import Testing
import TandemCore

@Suite struct MetadataLayoutTests {
    @Test func defaultLayoutOfOneTebibyte() throws {
        let layout = try MetadataLayout(deviceBytes: 1 << 40, granularityBytes: 4096, activityLogSlotCount: 8)
        #expect(layout.superblockOffset(slot: 0) == 0)
        #expect(layout.superblockOffset(slot: 1) == 4096)
        #expect(layout.activityLogOffset == 8192)
        #expect(layout.activityLogBytes == 8 * 4096)
        #expect(layout.activityLogSlotOffset(7) == 8192 + 7 * 4096)
        #expect(layout.bitmapOffset == 8192 + 8 * 4096)
        // 2^28 bits = 32 MiB of bitmap = 8192 pages.
        #expect(layout.bitmapBytes == 32 << 20 && layout.bitmapPageCount == 8192)
        #expect(layout.bitmapPageOffset(1) == layout.bitmapOffset + 4096)
        #expect(layout.totalBytes == layout.bitmapOffset + (32 << 20))
    }

    @Test func smallAndOddDevices() throws {
        let tiny = try MetadataLayout(deviceBytes: 1, granularityBytes: 4096, activityLogSlotCount: 2)
        #expect(tiny.bitmapBytes == 4096 && tiny.totalBytes == 5 * 4096)
        let odd = try MetadataLayout(deviceBytes: 32768 * 4096 + 1, granularityBytes: 4096, activityLogSlotCount: 3)
        #expect(odd.bitmapPageCount == 2 && odd.totalBytes % 4096 == 0)
        let coarse = try MetadataLayout(deviceBytes: 1 << 44, granularityBytes: 1 << 20, activityLogSlotCount: 8)
        #expect(coarse.bitmapBytes == UInt64(DirtyBitmap.pageCount(deviceBytes: 1 << 44, granularityBytes: 1 << 20)) * 4096)
    }

    @Test func rejectsWhatNoNodeCouldUse() {
        #expect(throws: MetadataError.badGranularity(3000)) {
            try MetadataLayout(deviceBytes: 1 << 30, granularityBytes: 3000, activityLogSlotCount: 8)
        }
        #expect(throws: MetadataError.badGranularity(2048)) {
            try MetadataLayout(deviceBytes: 1 << 30, granularityBytes: 2048, activityLogSlotCount: 8)
        }
        #expect(throws: MetadataError.badGranularity(1 << 21)) {
            try MetadataLayout(deviceBytes: 1 << 30, granularityBytes: 1 << 21, activityLogSlotCount: 8)
        }
        #expect(throws: MetadataError.badDeviceSize(0)) {
            try MetadataLayout(deviceBytes: 0, granularityBytes: 4096, activityLogSlotCount: 8)
        }
        // 32 TiB at 4 KiB is 2^33 bits, over the limit; at 64 KiB it is fine.
        #expect(throws: MetadataError.badDeviceSize(1 << 45)) {
            try MetadataLayout(deviceBytes: 1 << 45, granularityBytes: 4096, activityLogSlotCount: 8)
        }
        #expect(throws: Never.self) { try MetadataLayout(deviceBytes: 1 << 45, granularityBytes: 65536, activityLogSlotCount: 8) }
        #expect(throws: MetadataError.badActivityLogSlotCount(1)) {
            try MetadataLayout(deviceBytes: 1 << 30, granularityBytes: 4096, activityLogSlotCount: 1)
        }
        #expect(throws: MetadataError.badActivityLogSlotCount(1025)) {
            try MetadataLayout(deviceBytes: 1 << 30, granularityBytes: 4096, activityLogSlotCount: 1025)
        }
    }

    @Test func limitsRelate() {
        Limits.checkMetadataRelations()
        #expect(ActivityLog.ringSlotsMin(capacity: Limits.activityLogExtentsDefault) <= Limits.activityLogRingSlotsDefault)
        #expect(ActivityLog.extentsPerWriteMax(writeBytesMax: Limits.nbdRequestBytesMax, extentBytes: 4 << 20) == 9)
        #expect(ActivityLog.extentsPerWriteMax(writeBytesMax: 4096, extentBytes: 4 << 20) == 2)
        #expect(ActivityLog.extentsPerWriteMax(writeBytesMax: 1, extentBytes: 4 << 20) == 1)
    }
}
