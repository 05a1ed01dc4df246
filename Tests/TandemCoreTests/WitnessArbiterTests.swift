import Testing
import TandemCore

@Suite struct WitnessArbiterTests {
    private func arbiter() -> WitnessArbiter {
        var a = WitnessArbiter(dataNodes: [(0, "alpha"), (1, "beta")])
        _ = a.connected(0, role: .primary, disk: .upToDate)
        _ = a.connected(1, role: .secondary, disk: .upToDate)
        return a
    }

    @Test func aLivePrimaryIsNeverReplaced() {
        var a = arbiter()
        #expect(a.requestPrimary(1, disk: .upToDate) == .refused("alpha is primary and the witness still reaches it"))
    }

    @Test func aLostPrimaryInSyncIsReplacedOnceAndThenDeposed() {
        var a = arbiter()
        a.disconnected(0)
        #expect(a.requestPrimary(1, disk: .upToDate) == .granted)
        // The old primary comes back still claiming the role: it is told to demote.
        #expect(a.connected(0, role: .primary, disk: .upToDate) != nil)
        #expect(a.nodes[1]?.role == .primary)
        // Its announcements as primary before it demotes change nothing; then it may not take
        // the role back while beta is primary and reachable.
        a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: true)
        #expect(a.nodes[1]?.role == .primary && a.nodes[0]?.deposed == true)
        a.disconnected(0)
        _ = a.connected(0, role: .secondary, disk: .upToDate)
        #expect(a.requestPrimary(0, disk: .upToDate) == .refused("beta is primary and the witness still reaches it"))
    }

    @Test func aFencedSecondaryIsNotPromoted() {
        var a = arbiter()
        a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: true)
        a.disconnected(0)
        if case .refused(let why) = a.requestPrimary(1, disk: .upToDate) {
            #expect(why.contains("outdated"))
        } else {
            Issue.record("an outdated secondary was promoted")
        }
        // Once the primary replicates to it again, it may take over later.
        _ = a.connected(0, role: .primary, disk: .upToDate)
        a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: false)
        a.disconnected(0)
        #expect(a.requestPrimary(1, disk: .upToDate) == .granted)
    }

    private func u(_ current: UInt64, _ bitmap: UInt64 = 0, _ history: [UInt64] = [0, 0, 0, 0]) -> PeerGenerationUUIDs {
        PeerGenerationUUIDs(current: current, bitmap: bitmap, history: history)
    }

    /// Found by the simulator (`--witness`, seeds 347, 600): a restarted witness, which knows
    /// nothing, recorded a second primary writing without its peer.
    @Test func aRestartedWitnessFencesForOnePrimaryOnly() {
        var a = WitnessArbiter(dataNodes: [(0, "alpha"), (1, "beta")])
        // alpha, primary without its peer, asks first: beta is unknown, so it may be a primary
        // the old witness let take over.
        _ = a.connected(0, role: .primary, disk: .upToDate, uuids: u(0x100))
        #expect(a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: true, uuids: u(0x100)) != .granted)
        // beta took over before the restart and wrote since alpha's generation: it holds the
        // newer data and keeps the role; alpha must demote.
        #expect(a.connected(1, role: .primary, disk: .upToDate, uuids: u(0x200, 0x100)) == nil)
        #expect(a.announced(1, role: .primary, disk: .upToDate, writesWithoutPeer: true, uuids: u(0x200, 0x100)) == .granted)
        #expect(a.nodes[0]?.deposed == true)
        #expect(a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: true, uuids: u(0x100)) != .granted)
    }

    @Test func aRefusedPrimaryThatWroteAloneStillOutdatesItsPeer() {
        var a = WitnessArbiter(dataNodes: [(0, "alpha"), (1, "beta")])
        _ = a.connected(0, role: .primary, disk: .upToDate, uuids: u(0x300, 0x100))
        #expect(a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: true, uuids: u(0x300, 0x100)) != .granted)
        a.disconnected(0)
        _ = a.connected(1, role: .secondary, disk: .upToDate, uuids: u(0x100))
        #expect(a.requestPrimary(1, disk: .upToDate) != .granted, "alpha holds writes beta lacks")
    }

    /// Found by the simulator (`--witness --switchover`, seed 61): a primary wrote without its
    /// peer, then demoted while cut off; seeing it secondary, the witness promoted the peer.
    @Test func aPeerWhoseGenerationIsNewerBlocksThePromotion() {
        var a = arbiter()
        a.announced(0, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x300, 0x100))
        a.disconnected(0)
        #expect(a.requestPrimary(1, disk: .upToDate, uuids: u(0x100)) != .granted, "alpha wrote since beta's generation")
        #expect(a.requestPrimary(1, disk: .upToDate, uuids: u(0x300)) == .granted)
    }

    /// Found by the simulator (`--witness --failover --double-faults --overlapping-writes`, seed
    /// 632): the peer took over and wrote, restarted as secondary; the old primary, older, was
    /// let fence it.
    @Test func anOlderPrimaryMayNotFenceANewerPeer() {
        var a = arbiter()
        a.announced(1, role: .secondary, disk: .consistent, writesWithoutPeer: false, uuids: u(0x200, 0x100))
        #expect(a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: true, uuids: u(0x100)) != .granted)
        #expect(a.nodes[0]?.deposed == true)
    }

    @Test func aWitnessThatNeverHeardFromThePeerRefusesAndStaleDisksAreRefused() {
        var a = WitnessArbiter(dataNodes: [(0, "alpha"), (1, "beta")])
        _ = a.connected(1, role: .secondary, disk: .upToDate)
        #expect(a.requestPrimary(1, disk: .upToDate) != .granted, "alpha may be primary somewhere, with newer data")
        var b = arbiter()
        b.disconnected(0)
        #expect(b.requestPrimary(1, disk: .outdated) != .granted)
    }

    // MARK: Rollback records (Protocol/barriers.md "Rollback and the witness")

    /// alpha was primary and demoted; beta, its secondary, is about to roll back.
    private func demoted() -> WitnessArbiter {
        var a = arbiter()
        a.announced(0, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100))
        a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100))
        return a
    }

    /// Found by the simulator (`--witness --barriers`, seeds 37, 232): a rollback begun while
    /// the secondary was cut off from its peer lost its notice, and the witness promoted the peer.
    @Test func aRecordedRollbackKeepsThePeerFromBeingPromoted() {
        var a = demoted()
        #expect(a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true) == .granted)
        #expect(a.rollsBack(1) && !a.rollsBack(0))
        // The rolling-back node is gone from the witness too: the peer is still not promoted.
        a.disconnected(1)
        if case .refused(let why) = a.requestPrimary(0, disk: .upToDate, uuids: u(0x100)) {
            #expect(why.contains("beta rolls back to a barrier"), "\(why)")
        } else {
            Issue.record("the peer of a rolling-back node was promoted")
        }
        // Repeating it (every state the node reports while it rolls back) keeps the record.
        #expect(a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true) == .granted)
        #expect(a.rollsBack(1))
    }

    /// The race: the peer's promotion reached the witness first. The rollback is refused, and
    /// not recorded; the announcement's state is.
    @Test func aGrantToThePeerFirstRefusesTheRollback() {
        var a = demoted()
        a.disconnected(1)
        #expect(a.requestPrimary(0, disk: .upToDate, uuids: u(0x100)) == .granted)
        _ = a.connected(1, role: .secondary, disk: .upToDate, uuids: u(0x100))
        if case .refused(let why) = a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true) {
            #expect(why.contains("alpha is primary"), "\(why)")
        } else {
            Issue.record("a rollback was recorded under a primary")
        }
        #expect(!a.rollsBack(1) && a.nodes[0]?.role == .primary && a.nodes[1]?.role == .secondary)
        // And the other order: the record first, then the peer's request is refused.
        var b = demoted()
        #expect(b.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true) == .granted)
        b.disconnected(1)
        #expect(b.requestPrimary(0, disk: .upToDate, uuids: u(0x100)) != .granted)
        #expect(b.nodes[0]?.role == .secondary)
    }

    /// Found by the simulator (`--witness --barriers --failover --overlapping-writes`, seed
    /// 310036700): a partition hid the primary (alpha) from its secondary; alpha fenced beta
    /// through the witness, started a generation and answered writes alone, then demoted for the
    /// rollback's switchover. Beta, which had seen neither the promotion nor the link loss, asked
    /// to roll back and the witness recorded it: the rolled-back generation and alpha's both
    /// descended from the one they shared, a split brain at every connect, for good. Now the
    /// record is refused while the peer's generation descends from the node's.
    @Test func aPeerThatWroteWithoutTheNodeRefusesItsRollback() {
        var a = arbiter()
        a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100))
        a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100))
        #expect(a.announced(0, role: .primary, disk: .upToDate, writesWithoutPeer: true, uuids: u(0x100)) == .granted)
        a.announced(0, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x200, 0x100))
        if case .refused(let why) = a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true) {
            #expect(why.contains("alpha holds writes beta lacks"), "\(why)")
        } else {
            Issue.record("a rollback was recorded on data older than the peer's")
        }
        #expect(!a.rollsBack(1))
        // The node that holds the newer data may take the role back.
        #expect(a.requestPrimary(0, disk: .upToDate, uuids: u(0x200, 0x100)) == .granted)
        // Once beta resynced from alpha (it reports alpha's generation), it may roll back again.
        a.announced(0, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x200))
        #expect(a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x200), rollingBack: true) == .granted)
        #expect(a.rollsBack(1))
    }

    /// A restarted witness knows nothing: a rollback is not recorded before it heard from the
    /// peer (it may be a primary the witness let take over before the restart); a rollback
    /// already running comes back with the node's hello, before anything else.
    @Test func aRestartedWitnessLearnsARunningRollbackFromTheHello() {
        var a = WitnessArbiter(dataNodes: [(0, "alpha"), (1, "beta")])
        _ = a.connected(1, role: .secondary, disk: .upToDate, uuids: u(0x100))
        #expect(a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true) != .granted)
        #expect(!a.rollsBack(1))
        var b = WitnessArbiter(dataNodes: [(0, "alpha"), (1, "beta")])
        #expect(b.connected(1, role: .secondary, disk: .upToDate, uuids: u(0x100), rollingBack: true) == nil)
        #expect(b.rollsBack(1))
        _ = b.connected(0, role: .secondary, disk: .upToDate, uuids: u(0x100))
        b.disconnected(1)
        #expect(b.requestPrimary(0, disk: .upToDate, uuids: u(0x100)) != .granted)
    }

    /// The record ends when the node reports a state without it (its peer resynced from it, or
    /// the rollback did not start), when it becomes primary, or once the peer reports the
    /// rolled-back generation as its own.
    @Test func theRecordEndsOnceThePeerHasTheRolledBackData() {
        var a = demoted()
        a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true)
        a.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100))
        #expect(!a.rollsBack(1))
        a.disconnected(1)
        #expect(a.requestPrimary(0, disk: .upToDate, uuids: u(0x100)) == .granted)

        // The rolled-back node reported its new generation, then lost the witness; the peer
        // resyncs from it and reports that generation: the record is superseded.
        var b = demoted()
        b.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true)
        b.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x200, 0x100), rollingBack: true)
        b.announced(0, role: .secondary, disk: .outdated, writesWithoutPeer: false, uuids: u(0x100))
        #expect(b.rollsBack(1), "the peer still holds the old generation")
        b.disconnected(1)
        b.announced(0, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x200, 0, [0x100, 0, 0, 0]))
        #expect(!b.rollsBack(1))
        #expect(b.requestPrimary(0, disk: .upToDate, uuids: u(0x200, 0, [0x100, 0, 0, 0])) == .granted)

        // The rolled-back node itself may be promoted; that ends the record too.
        var c = demoted()
        c.announced(1, role: .secondary, disk: .upToDate, writesWithoutPeer: false, uuids: u(0x100), rollingBack: true)
        c.disconnected(0)
        #expect(c.requestPrimary(1, disk: .upToDate, uuids: u(0x200, 0x100)) == .granted)
        #expect(!c.rollsBack(1))
    }
}
