import Testing
import TandemSim

@Suite struct SimulatorTests {
    @Test func oneSeed() {
        let report = Simulator.run(seed: 1)
        #expect(report.failure == nil, "\(report.failure.map { "\($0)" } ?? "")")
    }
}
