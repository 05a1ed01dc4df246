/// A first-in first-out queue with a capacity fixed at creation: pushing past it is a bug.
/// Storage is allocated once, so steady-state use allocates nothing. Inlinable, so a queue in
/// another module (the peer link's send queue) is specialized there rather than run through
/// generic metadata on every push and pop.
public struct FixedQueue<Element> {
    @usableFromInline var storage: [Element?]
    @usableFromInline var head = 0
    @usableFromInline var stored = 0

    @inlinable
    public init(capacity: Int) {
        precondition(capacity > 0)
        storage = Array(repeating: nil, count: capacity)
    }

    @inlinable public var count: Int { stored }
    @inlinable public var capacity: Int { storage.count }
    @inlinable public var isEmpty: Bool { stored == 0 }
    @inlinable public var isFull: Bool { stored == storage.count }

    @inlinable
    public mutating func push(_ element: Element) {
        precondition(stored < storage.count, "FixedQueue over its capacity \(storage.count)")
        storage[(head + stored) % storage.count] = element
        stored += 1
    }

    @inlinable public var first: Element? { stored == 0 ? nil : storage[head] }
    @inlinable public var last: Element? { stored == 0 ? nil : storage[(head + stored - 1) % storage.count] }

    /// The element `i` places after the head.
    @inlinable
    public subscript(i: Int) -> Element {
        precondition(i >= 0 && i < stored)
        return storage[(head + i) % storage.count]!
    }

    @inlinable @discardableResult
    public mutating func pop() -> Element? {
        guard stored > 0 else { return nil }
        let element = storage[head]
        storage[head] = nil
        head = (head + 1) % storage.count
        stored -= 1
        return element
    }

    /// Takes the newest element off (so it can be extended in place and pushed back).
    @inlinable
    public mutating func popLast() -> Element? {
        guard stored > 0 else { return nil }
        let at = (head + stored - 1) % storage.count
        let element = storage[at]
        storage[at] = nil
        stored -= 1
        return element
    }

    @inlinable
    public mutating func removeAll() {
        while pop() != nil {}
    }
}
