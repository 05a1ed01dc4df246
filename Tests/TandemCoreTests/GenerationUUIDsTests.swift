import Testing
import TandemCore

@Suite struct GenerationUUIDsTests {
    typealias G = GenerationUUIDs
    typealias D = GenerationUUIDs.SyncDecision
    let ok: Superblock.Flags = [.consistent]
    let crashed: Superblock.Flags = [.consistent, .wasPrimary]
    let inconsistent: Superblock.Flags = [.resyncTarget]

    func u(_ current: UInt64, _ bitmap: UInt64 = 0, _ h0: UInt64 = 0, _ h1: UInt64 = 0) -> G {
        G(current: current, bitmap: bitmap, history0: h0, history1: h1)
    }

    /// Decides from both sides and checks they agree (one source, one target).
    func both(_ local: G, _ peer: G, _ localFlags: Superblock.Flags? = nil, _ peerFlags: Superblock.Flags? = nil,
              localWinsTie: Bool = true, sourceLocation: SourceLocation = #_sourceLocation) -> D {
        let lf = localFlags ?? ok, pf = peerFlags ?? ok
        let mine = G.decide(local: local, peer: peer, localFlags: lf, peerFlags: pf, localWinsTie: localWinsTie)
        let theirs = G.decide(local: peer, peer: local, localFlags: pf, peerFlags: lf, localWinsTie: !localWinsTie)
        #expect(theirs == Self.mirror(mine), "peer decided \(theirs) for \(mine)", sourceLocation: sourceLocation)
        return mine
    }

    static func mirror(_ d: D) -> D {
        switch d {
        case .becomeSource: .becomeTarget
        case .becomeTarget: .becomeSource
        case .fullSyncAsSource: .fullSyncAsTarget
        case .fullSyncAsTarget: .fullSyncAsSource
        case .noSync, .splitBrain, .unrelatedData, .skipInitialSync: d
        }
    }

    // MARK: Rules

    @Test func justCreated() {
        let fresh = G()
        #expect(fresh.isInitial && fresh.current == G.initialCurrent)
        #expect(both(fresh, fresh, [.newZeroed], [.newZeroed]) == .skipInitialSync)
        #expect(both(fresh, fresh, [.newZeroed], []) == .noSync, "one side may hold old data: an operator decides")
        #expect(both(fresh, fresh, [], []) == .noSync)
        #expect(both(fresh, u(0x100), [], ok) == .fullSyncAsTarget)
        #expect(both(u(0x100), fresh, ok, [.newZeroed]) == .fullSyncAsSource, "zeroed on one side only: copy everything")
        #expect(G.decideWithRule(local: fresh, peer: u(0x100), localFlags: [], peerFlags: ok, localWinsTie: true).rule == .localInitial)
        #expect(both(u(0), u(0x100), [], ok) == .fullSyncAsTarget, "no current at all counts as just created")
    }

    @Test func sameGeneration() {
        #expect(both(u(0x100, 0, 0x80), u(0x100, 0, 0x80)) == .noSync)
        #expect(both(u(0x101), u(0x100)) == .noSync, "bit 0 is not compared")
    }

    @Test func crashedPrimary() {
        // Both were connected with the same generation; one crashed as primary: its activity log
        // marked the extents that may differ, so it is the source of a bitmap resync.
        let same = u(0x100, 0, 0x80)
        #expect(both(same, same, crashed, ok) == .becomeSource)
        #expect(both(same, same, ok, crashed) == .becomeTarget)
        #expect(both(same, same, crashed, crashed, localWinsTie: true) == .becomeSource)
        #expect(both(same, same, crashed, crashed, localWinsTie: false) == .becomeTarget)
        // Both crashed as primary: the side whose bitmap holds marks (writes the other may lack)
        // is the source whatever the node ids say; marks on both sides (or none) are a tie.
        #expect(G.decide(local: same, peer: same, localFlags: crashed, peerFlags: crashed,
                         localMarked: false, peerMarked: true, localWinsTie: true) == .becomeTarget)
        #expect(G.decide(local: same, peer: same, localFlags: crashed, peerFlags: crashed,
                         localMarked: true, peerMarked: false, localWinsTie: false) == .becomeSource)
        #expect(G.decide(local: same, peer: same, localFlags: crashed, peerFlags: crashed,
                         localMarked: true, peerMarked: true, localWinsTie: false) == .becomeTarget)
        // Only both crashed: one crashed primary is the source even with no marks.
        #expect(G.decide(local: same, peer: same, localFlags: crashed, peerFlags: ok,
                         localMarked: false, peerMarked: true, localWinsTie: false) == .becomeSource)
        // Restarted, then demoted cleanly before reconnecting: wasPrimary is gone, crashedPrimary
        // still says the hot extents need resyncing.
        #expect(both(same, same, [.consistent, .crashedPrimary], ok) == .becomeSource)
        let ruled = G.decideWithRule(local: same, peer: same, localFlags: crashed, peerFlags: ok, localWinsTie: false)
        #expect(ruled.rule == .equalCurrents && ruled.rule.rawValue == 40)
    }

    @Test func unfinishedResyncWithTheSameGeneration() {
        // The target adopted the source's generation but the source crashed before clearing its
        // bitmap UUID: the source still resyncs whatever its bitmap says.
        #expect(both(u(0x200, 0x100), u(0x200, 0, 0x100)) == .becomeSource)
        #expect(both(u(0x200, 0, 0x100), u(0x200, 0x100)) == .becomeTarget)
    }

    @Test func bitmapRelations() {
        // The peer wrote since my generation (its bitmap UUID is my current).
        #expect(both(u(0x100), u(0x200, 0x100)) == .becomeTarget)
        #expect(G.decideWithRule(local: u(0x100), peer: u(0x200, 0x100), localFlags: ok, peerFlags: ok, localWinsTie: true).rule == .peerBitmapIsLocalCurrent)
        // I wrote since the peer's generation.
        #expect(both(u(0x200, 0x100), u(0x100)) == .becomeSource)
        #expect(G.decideWithRule(local: u(0x200, 0x100), peer: u(0x100), localFlags: ok, peerFlags: ok, localWinsTie: true).rule == .localBitmapIsPeerCurrent)
        #expect(both(u(0x200, 0x101), u(0x100)) == .becomeSource, "bit 0 is not compared")
    }

    @Test func historyMeansFullSync() {
        #expect(both(u(0x100), u(0x300, 0, 0x200, 0x100)) == .fullSyncAsTarget)
        #expect(both(u(0x100), u(0x300, 0, 0x100)) == .fullSyncAsTarget)
        #expect(both(u(0x300, 0x280, 0x100), u(0x100)) == .fullSyncAsSource)
    }

    @Test func splitBrain() {
        // Both wrote since generation 0x100 (both lost each other as primary).
        #expect(both(u(0x200, 0x100), u(0x300, 0x100)) == .splitBrain)
        #expect(both(u(0x300, 0x100), u(0x200, 0x100)) == .splitBrain)
        #expect(G.decideWithRule(local: u(0x200, 0x100), peer: u(0x300, 0x100), localFlags: ok, peerFlags: ok, localWinsTie: true).rule == .equalBitmaps)
        // An older common generation, below both bitmaps.
        #expect(both(u(0x400, 0x200, 0x100), u(0x500, 0x300, 0x100)) == .splitBrain)
        #expect(both(u(0x400, 0, 0x200, 0x100), u(0x500, 0x300, 0, 0x100)) == .splitBrain)
        #expect(both(u(0x400, 0x200), u(0x500, 0x300, 0x200)) == .splitBrain, "my bitmap in the peer's history")
        #expect(G.decideWithRule(local: u(0x400, 0x200, 0x100), peer: u(0x500, 0x300, 0x100), localFlags: ok, peerFlags: ok, localWinsTie: true).rule == .sharedAncestor)
        // Impossible histories (each side's bitmap is the other's current): never both target.
        #expect(both(u(0x200, 0x100), u(0x100, 0x200)) == .splitBrain)
        #expect(both(u(0x200, 0, 0x100), u(0x100, 0, 0x200)) == .splitBrain)
        #expect(G.decideWithRule(local: u(0x200, 0x100), peer: u(0x100, 0x200), localFlags: ok, peerFlags: ok, localWinsTie: true).rule == .contradictory)
        // Even as crashed primaries: the rule is about generations, not roles.
        #expect(both(u(0x200, 0x100), u(0x300, 0x100), crashed, crashed) == .splitBrain)
    }

    @Test func unrelated() {
        #expect(both(u(0x200, 0x100), u(0x300, 0x180)) == .unrelatedData)
        #expect(both(u(0x200), u(0x300)) == .unrelatedData)
        // Disk states never make unrelated data related.
        #expect(both(u(0x200), u(0x300), ok, inconsistent) == .unrelatedData)
    }

    @Test func consistentSideWinsOverInconsistent() {
        // Same generation, the peer an interrupted resync target: resume, bitmap-based.
        #expect(both(u(0x100), u(0x100), ok, inconsistent) == .becomeSource)
        #expect(both(u(0x100), u(0x100), inconsistent, ok) == .becomeTarget)
        #expect(both(u(0x100), u(0x100), [], [.consistent, .outdated]) == .becomeTarget, "Outdated is consistent")
        // The rule would make the inconsistent side the source: the consistent one is anyway.
        #expect(both(u(0x200, 0x100), u(0x100), inconsistent, ok) == .becomeTarget)
        #expect(both(u(0x300, 0, 0x100), u(0x100), inconsistent, ok) == .fullSyncAsTarget)
        // Split brain found through the bitmaps stays bitmap-based, through history it is full.
        #expect(both(u(0x200, 0x100), u(0x300, 0x100), ok, inconsistent) == .becomeSource)
        #expect(both(u(0x400, 0x200, 0x100), u(0x500, 0x300, 0x100), ok, inconsistent) == .fullSyncAsSource)
        // Both Inconsistent: no source at all, whatever the UUIDs say (found by the simulator, with
        // both disks detached: a crashed primary's Inconsistent disk became the source).
        #expect(both(u(0x100), u(0x100), inconsistent, inconsistent) == .noSync)
        #expect(both(u(0x100), u(0x100), [.resyncTarget, .crashedPrimary], inconsistent) == .noSync)
        #expect(both(u(0x200, 0x100), u(0x100), inconsistent, []) == .noSync)
        #expect(both(u(0x300, 0, 0x100), u(0x100), [], inconsistent) == .noSync)
    }

    /// Whatever the UUIDs and flags, the two sides reach mirror-image decisions, so they never
    /// both become source or both target.
    @Test func decisionsAreSymmetric() {
        var rng = MetadataTestRNG(seed: 5)
        let pool: [UInt64] = [0, 0, 0, 4, 0x100, 0x101, 0x200, 0x300]
        let flagChoices: [Superblock.Flags] = [[], [.consistent], [.consistent, .wasPrimary], [.resyncTarget], [.newZeroed], [.consistent, .outdated]]
        for _ in 0..<5000 {
            func pick() -> G { u(pool[rng.below(pool.count)] | 4, pool[rng.below(pool.count)], pool[rng.below(pool.count)], pool[rng.below(pool.count)]) }
            let a = pick(), b = pick()
            let fa = flagChoices[rng.below(flagChoices.count)], fb = flagChoices[rng.below(flagChoices.count)]
            _ = both(a, b, fa, fb, localWinsTie: rng.below(2) == 0)
        }
    }

    // MARK: Transitions

    @Test func rotation() {
        let connected = u(0x100, 0, 0x80, 0x40)
        let alone = connected.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x200)
        #expect(alone == u(0x200, 0x100, 0x80, 0x40))
        #expect(alone.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x300) == alone,
                "the bitmap already tracks everything since the peer's generation")
        #expect(G().rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x200) == u(0x200),
                "from just created there is nothing to track against")
    }

    @Test func afterResync() {
        let source = u(0x200, 0x100, 0x80, 0x40)
        #expect(source.afterResyncAsSource() == u(0x200, 0, 0x100, 0x80))
        #expect(u(0x200, 0, 0x80).afterResyncAsSource() == u(0x200, 0, 0x80))
        #expect(u(0x100, 0, 0x80, 0x40).adoptedAfterResyncAsTarget(sourceCurrent: 0x200) == u(0x200, 0, 0x100, 0x80))
        #expect(u(0x100, 0, 0x80).adoptedAfterResyncAsTarget(sourceCurrent: 0x100) == u(0x100, 0, 0x80), "a crashed-primary resync keeps the generation")
        #expect(G().adoptedAfterResyncAsTarget(sourceCurrent: 0x200) == u(0x200), "initial is no generation to remember")
        // A split-brain loser drops its bitmap generation and its own into history.
        #expect(u(0x300, 0x100, 0x80).adoptedAfterResyncAsTarget(sourceCurrent: 0x200) == u(0x200, 0, 0x300, 0x100))
        #expect(G().afterSkippedInitialSync(newCurrent: 0x500) == u(0x500))
    }

    // MARK: Stories

    /// Two nodes through disconnects, crashes, failover and split brain, each step decided from
    /// both sides.
    @Test func lifeOfAResource() {
        var a = G(), b = G()
        // Created on zeroed devices: skip the initial sync, one new generation for both.
        #expect(both(a, b, [.newZeroed], [.newZeroed]) == .skipInitialSync)
        a = a.afterSkippedInitialSync(newCurrent: 0x1000)
        b = b.afterSkippedInitialSync(newCurrent: 0x1000)
        #expect(both(a, b) == .noSync)

        // A is primary and loses B: A writes on in a new generation; B resyncs from A's bitmap.
        a = a.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x2000)
        #expect(both(a, b) == .becomeSource)
        a = a.afterResyncAsSource()
        b = b.adoptedAfterResyncAsTarget(sourceCurrent: a.current)
        #expect(a == b && both(a, b) == .noSync)

        // A crashes as primary while connected: same generation, A's hot extents go to B.
        #expect(both(a, b, crashed, ok) == .becomeSource)

        // Failover: A crashes, B is promoted and writes. A comes back: target of B's bitmap
        // (A's own hot extents merge into it), whatever A's crashed flag says.
        b = b.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x3000)
        #expect(both(a, b, crashed, ok) == .becomeTarget)
        // The resync is interrupted: A is Inconsistent, still in its old generation: resume.
        #expect(both(a, b, inconsistent, ok) == .becomeTarget)
        b = b.afterResyncAsSource()
        a = a.adoptedAfterResyncAsTarget(sourceCurrent: b.current)
        #expect(both(a, b) == .noSync)

        // B loses A twice without resync in between; A never saw either generation.
        b = b.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x4000)
        #expect(both(a, b) == .becomeTarget)
        b = b.afterResyncAsSource()
        a = a.adoptedAfterResyncAsTarget(sourceCurrent: b.current)
        let stale = a
        b = b.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x5000)
        b = b.afterResyncAsSource()  // (resynced with some other replacement of A)
        #expect(both(stale, b) == .fullSyncAsTarget, "B's bitmap no longer covers A's generation")
        a = stale.adoptedAfterResyncAsTarget(sourceCurrent: b.current)

        // Split brain: both promoted while apart.
        a = a.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x6000)
        b = b.rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x7000)
        #expect(both(a, b) == .splitBrain)
        // The operator discards A's data: A becomes a full-sync target and adopts B's generation.
        b = b.afterResyncAsSource()
        a = a.adoptedAfterResyncAsTarget(sourceCurrent: b.current)
        #expect(both(a, b) == .noSync)

        // Another cluster's node.
        let stranger = G().rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x9000)
        #expect(both(a, stranger) == .unrelatedData)
    }

    @Test func reusedUUIDIsABug() async {
        await #expect(processExitsWith: .failure) {
            _ = GenerationUUIDs(current: 0x100, bitmap: 0, history0: 0, history1: 0)
                .rotatedForNewPrimaryDataWhileDisconnected(newCurrent: 0x101)
        }
    }
}
