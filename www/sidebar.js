// sidebar.js — owns the two lists in the sidebar: the people in the room (#users) and the
// rooms with their member counts (#rooms). It only draws; app.js decides what to show.

/** Sorts names the way the server does: case-insensitively. */
export function sortNames(names) {
  return [...names].sort((a, b) => {
    const x = a.toLowerCase();
    const y = b.toLowerCase();
    return x < y ? -1 : x > y ? 1 : 0;
  });
}

/**
 * Draws the member list. Every other person is a button that picks them as the target of
 * a private message. `more` counts members of a big room the server did not name.
 * @param {HTMLUListElement} ul
 * @param {{users: string[], more: number, me: string, privateTo: string|null, onPick: (name: string) => void}} opts
 */
export function renderUsers(ul, { users, more, me, privateTo, onPick }) {
  const items = users.map((name) => {
    const li = document.createElement('li');
    li.dataset.name = name;
    if (name === me) {
      li.classList.add('own');
      const span = document.createElement('span');
      span.className = 'name';
      span.textContent = name;
      const you = document.createElement('span');
      you.className = 'you';
      you.textContent = ' (you)';
      li.append(span, you);
    } else {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'name';
      button.textContent = name;
      button.title = `Send a private message to ${name}`;
      button.setAttribute('aria-pressed', String(name === privateTo));
      button.addEventListener('click', () => onPick(name));
      li.append(button);
    }
    return li;
  });
  if (more > 0) {
    const li = document.createElement('li');
    li.className = 'more';
    li.textContent = `and ${more.toLocaleString()} more`;
    items.push(li);
  }
  ul.replaceChildren(...items);
}

/**
 * Draws the room list; the current room is marked with aria-current.
 * @param {HTMLUListElement} ul
 * @param {{rooms: {name: string, count: number}[], current: string, onPick: (room: string) => void}} opts
 */
export function renderRooms(ul, { rooms, current, onPick }) {
  const items = rooms.map(({ name, count }) => {
    const li = document.createElement('li');
    li.dataset.room = name;
    const button = document.createElement('button');
    button.type = 'button';
    const label = document.createElement('span');
    label.className = 'name';
    label.textContent = `#${name}`;
    const badge = document.createElement('span');
    badge.className = 'count';
    badge.textContent = String(count);
    badge.title = `${count} online`;
    button.append(label, badge);
    button.setAttribute('aria-label', `#${name}, ${count} online`);
    if (name === current) button.setAttribute('aria-current', 'true');
    button.addEventListener('click', () => onPick(name));
    li.append(button);
    return li;
  });
  ul.replaceChildren(...items);
}
