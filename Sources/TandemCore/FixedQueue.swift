/// A first-in first-out queue with a capacity fixed at creation: pushing past it is a bug.
/// Storage is allocated once, so steady-state use allocates nothing.
public struct FixedQueue<Element> {
    private var storage: [Element?]
    private var head = 0
    public private(set) var count = 0

    public init(capacity: Int) {
        precondition(capacity > 0)
        storage = Array(repeating: nil, count: capacity)
    }

    public var capacity: Int { storage.count }
    public var isEmpty: Bool { count == 0 }
    public var isFull: Bool { count == storage.count }

    public mutating func push(_ element: Element) {
        precondition(count < storage.count, "FixedQueue over its capacity \(storage.count)")
        storage[(head + count) % storage.count] = element
        count += 1
    }

    public var first: Element? { count == 0 ? nil : storage[head] }

    /// The element `i` places after the head.
    public subscript(i: Int) -> Element {
        precondition(i >= 0 && i < count)
        return storage[(head + i) % storage.count]!
    }

    @discardableResult
    public mutating func pop() -> Element? {
        guard count > 0 else { return nil }
        let element = storage[head]
        storage[head] = nil
        head = (head + 1) % storage.count
        count -= 1
        return element
    }

    public mutating func removeAll() {
        while pop() != nil {}
    }
}
